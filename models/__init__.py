"""Models by name: `model.name` in the config picks the class and its config schema."""

from __future__ import annotations

import torch
from torch import nn

from models.llama import LlamaConfig, LlamaForCausalLM
from torchprime.errors import ConfigError

#: name → model class; each takes its config dataclass and has `init_weights(generator)`.
MODELS: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM}


def build_model(cfg: LlamaConfig, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device: shapes and names only, no memory, parameters in `dtype`.

    torchprime.materialize turns it into device tensors module by module, each initialized on
    the host and sent already sharded, so a large model is never whole on one device; small
    models (tests, tools) may simply `to_empty(device=...)` and `init_weights(generator)`.
    """
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name={cfg.name!r}: known models are {', '.join(MODELS)}.")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters in the model dtype; buffers choose their own
    try:
        with torch.device("meta"):
            return MODELS[cfg.name](cfg)
    finally:
        torch.set_default_dtype(previous)
