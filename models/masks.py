"""Additive attention biases: 0 where a query may attend to a key, the dtype's minimum where
it may not. Broadcastable to [batch, heads, query, key]; the model adds the causal mask itself."""

from __future__ import annotations

import torch


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] mask (1 = real token, 0 = padding) → [B, 1, 1, T]: no query attends to padding."""
    blocked = attention_mask[:, None, None, :] == 0
    return torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        blocked, torch.finfo(dtype).min
    )


def segment_bias(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] document ids of packed rows → [B, 1, T, T]: a token attends only within its own
    document, so packed documents do not see each other."""
    blocked = segment_ids[:, None, :, None] != segment_ids[:, None, None, :]
    return torch.zeros(blocked.shape, dtype=dtype, device=segment_ids.device).masked_fill(
        blocked, torch.finfo(dtype).min
    )
