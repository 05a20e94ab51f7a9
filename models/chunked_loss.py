"""Cross-entropy of the LM head computed in chunks of positions (`model.loss_chunk_size`).

The [rows, positions, vocab] logits, and their float32 copy for the loss, are the largest
activations of a Llama with a 128k vocabulary (23.5 GiB of the 38 GiB per chip the dry run of
llama3_8b_v5p_128 estimated). Here the final norm's output [B, T, E] is cut along the
positions into chunks of `chunk_size` (every row in each chunk, so a batch split over devices
keeps every device busy in every chunk; the last chunk holds the remainder when chunk_size does
not divide T). For each chunk the forward pass computes the head's matmul, a float32
log-softmax and the summed loss, and drops the logits; the backward pass computes them again,
chunk by chunk, and turns each into its share of the gradients. So at most one chunk's logits
exist at a time, for the price of the head's matmul once more.

The loop is Python over a static number of chunks: on XLA it unrolls into the step's graph (no
extra compilation). `barrier` (the backend's optimization barrier, set from outside) threads
each chunk's inputs with the running sums, so the compiler can neither merge the recomputed
logits with the forward's (keeping them all alive) nor run the chunks side by side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IGNORE_INDEX = -100

Barrier = Callable[[list[torch.Tensor]], None]


def chunk_bounds(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of `length` positions; the last one holds the remainder."""
    return [(s, min(s + chunk_size, length)) for s in range(0, length, chunk_size)]


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul's dtype: autocast's where it is on (precision.compute), else the operands'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, C, E] x [V, E] → float32 [B, C, V], the matmul in `dtype` (as the head would be)."""
    return torch.matmul(h.to(dtype), w.to(dtype).t()).float()


def _is_target(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """[B, C, V] booleans, true at each position's target: elementwise, so a vocabulary or
    batch split over devices stays split (a gather or scatter by index would be gathered)."""
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    return vocab == targets[..., None]


def _barrier(barrier: Barrier | None, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if barrier is None:
        return tensors
    tensors = [t.clone() for t in tensors]  # a barrier rewrites its tensors: not the views
    barrier(tensors)
    return tensors


class _ChunkedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, barrier):
        dtype = _compute_dtype(hidden, weight)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s, e in chunk_bounds(hidden.shape[1], chunk_size):
                h, total = _barrier(barrier, [hidden[:, s:e], total])
                logits = _chunk_logits(h, weight, dtype)  # [B, C, V]
                t = targets[:, s:e]
                real = t != IGNORE_INDEX
                picked = torch.where(_is_target(t, logits), logits, 0.0).sum(-1)
                lse = torch.logsumexp(logits, dim=-1)
                total = total + torch.where(real, lse - picked, 0.0).sum()
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size, ctx.barrier, ctx.dtype = chunk_size, barrier, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets = ctx.saved_tensors
        dtype = ctx.dtype
        grad_hidden = []
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s, e in chunk_bounds(hidden.shape[1], ctx.chunk_size):
                h, grad_weight = _barrier(ctx.barrier, [hidden[:, s:e], grad_weight])
                logits = _chunk_logits(h, weight, dtype)
                t = targets[:, s:e]
                real = (t != IGNORE_INDEX)[..., None]
                # d(lse - logit[target]) / d logits = softmax - one_hot(target)
                dlogits = torch.softmax(logits, dim=-1) - _is_target(t, logits).float()
                dlogits = (torch.where(real, dlogits, 0.0) * grad_total).to(dtype)  # [B, C, V]
                grad_hidden.append(torch.matmul(dlogits, weight.to(dtype)).to(hidden.dtype))
                flat_d = dlogits.reshape(-1, dlogits.shape[-1])
                flat_h = h.reshape(-1, h.shape[-1]).to(dtype)
                grad_weight = grad_weight + torch.matmul(flat_d.t(), flat_h).float()
        return torch.cat(grad_hidden, dim=1), grad_weight.to(weight.dtype), None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    barrier: Barrier | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """Mean cross-entropy of the head `weight` [V, E] on `hidden` [B, T, E] against `targets`
    [B, T] (position t scored against targets[:, t]; -100: no target), the float32 logits made
    `chunk_size` positions at a time. Summed and divided by the real targets of the batch, as
    models.llama.cross_entropy is.

    `groups` > 1: the positions are split over that many devices in contiguous blocks (context
    parallelism). Each block is then cut into chunks of chunk_size / groups positions and chunk
    i holds the i-th of every block: a row seen as [B * groups, T / groups] keeps the split on
    its first dimension, so every device works on every chunk (cut straight along the
    positions, a chunk would lie on one device while the others wait)."""
    if groups > 1:
        rows, length = targets.shape
        if length % groups:
            raise ValueError(f"{length} positions do not split into {groups} groups")
        hidden = hidden.reshape(rows * groups, length // groups, hidden.shape[-1])
        targets = targets.reshape(rows * groups, length // groups)
        chunk_size = -(-chunk_size // groups)
    total = _ChunkedLMHeadLoss.apply(hidden, weight, targets, chunk_size, barrier)
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / count
