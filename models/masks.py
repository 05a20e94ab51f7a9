"""Attention masks. Two forms:

- boolean masks built inside attention at each call (`allowed_keys`): from segment ids
  (packed documents), the causal order and the tokens' places in the row. Never stored on the
  model, never a float [batch, heads, query, key] tensor;
- additive biases for users who bring their own (`padding_bias`, `segment_bias`): 0 where a
  query may attend to a key, the dtype's minimum where it may not, broadcastable to
  [batch, heads, query, key]. The model adds its causal mask to them itself.
"""

from __future__ import annotations

import torch


def allowed_keys(
    is_causal: bool,
    q_len: int,
    k_len: int,
    device: torch.device,
    segment_ids: torch.Tensor | None = None,
    token_index: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Which keys each query may attend to: bool, broadcastable to [B, 1, q_len, k_len]; None
    when every key is allowed.

    segment_ids [B, T]: a query sees only keys of its own segment (packed documents).
    token_index [T] or [B, T]: each token's place in the original row, when the sequence was
    reordered (context load balancing); the causal order compares these, not the places in
    the tensor. Queries and keys span the same tokens (T = q_len = k_len).
    """
    allowed = None
    if is_causal:
        if token_index is None:
            q_at = torch.arange(q_len, device=device)[:, None]
            k_at = torch.arange(k_len, device=device)[None, :]
            allowed = q_at >= k_at  # [T, T]
        else:
            index = token_index if token_index.dim() == 2 else token_index[None]
            allowed = index[:, None, :, None] >= index[:, None, None, :]  # [B|1, 1, T, T]
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, T, T]
        allowed = same if allowed is None else same & allowed
    return allowed


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] mask (1 = real token, 0 = padding) → [B, 1, 1, T]: no query attends to padding."""
    blocked = attention_mask[:, None, None, :] == 0
    return torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        blocked, torch.finfo(dtype).min
    )


def segment_bias(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] document ids of packed rows → [B, 1, T, T] additive bias: a token attends only
    within its own document. The model takes `segment_ids` directly and builds this mask
    per layer call without storing it; this dense form is for comparisons and custom biases."""
    blocked = segment_ids[:, None, :, None] != segment_ids[:, None, None, :]
    return torch.zeros(blocked.shape, dtype=dtype, device=segment_ids.device).masked_fill(
        blocked, torch.finfo(dtype).min
    )
