"""Capacity routing within each row (`model.moe_implementation=capacity_per_row`): the
mixture-of-experts dispatch that expert parallelism moves with all-to-alls.

Each row of the batch is its own routing group, as in GShard: an expert takes at most
C = ceil(capacity_factor x T x k / E) of a row's T tokens, the row's first choices before its
second ones, the rest dropped (the token keeps its residual) and counted. Positions are counted
within the row, so a device routes the rows it holds without looking at any other device's.
The tokens go into the experts' buffers and come back by one-hot einsums ([rows, T, E, C]
masks), not by index gathers, which the SPMD partitioner can only serve by gathering every
row: the buffers [E, rows x C, H] are split over the rows where they are computed, and over
the experts where the experts run. The block hands them to its `constrain_dispatch` seam with
their role ("dispatch": rows to experts, "combine": experts back to rows), so that under
expert parallelism each becomes one all-to-all over `expert` (torchprime/experts.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def route_per_row(
    x: torch.Tensor,
    weights: torch.Tensor,
    chosen: torch.Tensor,
    experts: Callable[[torch.Tensor], torch.Tensor],
    num_experts: int,
    capacity: int,
    constrain: Callable[[torch.Tensor, str], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, H], the router's renormalized weights and choices [B x T, k], `experts`
    ([E, n, H] → [E, n, H]) of `num_experts` E, `capacity` C slots per row and expert →
    (output [B, T, H], the count of dropped assignments)."""
    B, T, H = x.shape
    k = chosen.shape[-1]
    expert = chosen.view(B, T, k).transpose(1, 2).reshape(B, k * T)  # first choices first
    E = num_experts
    onehot = F.one_hot(expert, E)  # [B, kT, E]
    position = (torch.cumsum(onehot, dim=1) * onehot).sum(dim=-1) - 1  # place in its expert
    kept = position < capacity
    slot = F.one_hot(torch.where(kept, position, capacity), capacity + 1)[..., :capacity]
    assigned = (onehot[..., None] * slot[:, :, None, :]).to(x.dtype)  # [B, kT, E, C]
    # each (expert, slot) of a row holds at most one token: summing the k choices is exact
    dispatch = assigned.view(B, k, T, E, capacity).sum(dim=1)  # [B, T, E, C]
    share = weights.view(B, T, k).transpose(1, 2).reshape(B, k * T, 1, 1).to(x.dtype)
    combine = (assigned * share).view(B, k, T, E, capacity).sum(dim=1)  # [B, T, E, C]
    buffers = torch.einsum("btec,bth->ebch", dispatch, x).reshape(E, B * capacity, H)
    y = constrain(experts(constrain(buffers, "dispatch")), "combine")
    out = torch.einsum("ebch,btec->bth", y.view(E, B, capacity, H), combine)
    return out, (~kept).sum().float()
