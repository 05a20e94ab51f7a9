"""Collators by name (`data.collator`): a list of packed rows → the model's input tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from collators.causal_lm import collate_causal_lm
from torchprime.errors import ConfigError

#: rows (dicts of int lists, data/packing.py) → dict of int64 [batch, block_size] tensors
Collator = Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]
COLLATORS: dict[str, Collator] = {"causal_lm": collate_causal_lm}


def get_collator(name: str) -> Collator:
    if name not in COLLATORS:
        raise ConfigError(f"data.collator={name!r}: known collators are {', '.join(COLLATORS)}.")
    return COLLATORS[name]
