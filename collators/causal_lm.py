"""Next-token prediction on packed rows: every token is both input and (shifted) label."""

from __future__ import annotations

import torch


def collate_causal_lm(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """rows of equal length → input_ids and labels, both [batch, block_size] int64.

    Labels equal the inputs; the model's loss shifts them by one position.
    """
    input_ids = torch.tensor(rows, dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}
