"""Context parallelism: the sequence split over the `context` mesh axis.

With `ici_mesh.context` x `dcn_mesh.context` = N > 1, every [batch, sequence] input (ids,
labels, positions, segment ids) is split over `context` on its sequence dimension, besides
the batch over (data, fsdp) (`torchprime.sharding.BATCH_SPEC`), and so are the activations
between layers (the `*_cp` sharding presets annotate them). Each device then holds T / N tokens
of every row it works on. Attention is the one place that needs the whole sequence: the
queries stay split, the keys and values are gathered whole over `context` (an all-gather,
inserted by XLA where `SequenceLayout.keys_values` lays them out), so every query sees its
whole causal past. The model is plain PyTorch: the layout is handed to its attention modules
from outside (`place_sequence_layout`), as the Pallas kernels' mesh is.

With causal attention the devices holding the end of the row have more keys to look at than
those holding its start. `model.load_balance_context` reorders each row into 2N chunks, device
i getting chunks i and 2N-1-i (`load_balance_order`), so each does the same work; the causal
order and the loss follow the tokens' original places (trainers/lm_trainer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchprime.attention import TPU_KERNELS
from torchprime.backend.base import Backend
from torchprime.errors import Problems
from torchprime.mesh import Mesh, PartitionSpec

#: Queries [batch, heads, sequence, head_dim]: split over the sequence like the activations.
QUERY_SPEC: PartitionSpec = (("data", "fsdp"), "tensor", "context", None)
#: Keys and values: whole over the sequence, gathered over `context`.
KEY_VALUE_SPEC: PartitionSpec = (("data", "fsdp"), "tensor", None, None)


def context_size(mesh: Mesh) -> int:
    """Devices the sequence is split over (ici x dcn)."""
    return mesh.shape["context"]


def load_balance_order(seq_len: int, context: int) -> torch.Tensor:
    """The permutation of a row's positions that balances causal work over `context` devices:
    the row cut into 2N chunks and laid out as chunk 0, 2N-1, 1, 2N-2, ..., so device i holds
    chunks i and 2N-1-i. `order[j]` is the original position of the token placed at j."""
    chunks = 2 * context
    if seq_len % chunks:
        raise ValueError(f"a sequence of {seq_len} does not cut into {chunks} chunks")
    pairs = [c for i in range(context) for c in (i, chunks - 1 - i)]
    return torch.arange(seq_len).view(chunks, seq_len // chunks)[pairs].reshape(-1)


@dataclass(frozen=True)
class SequenceLayout:
    """How attention lays out its queries, keys and values when the sequence is split."""

    backend: Backend
    mesh: Mesh

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return self.backend.shard_activation(q, self.mesh, QUERY_SPEC)

    def keys_values(self, kv: torch.Tensor) -> torch.Tensor:
        return self.backend.shard_activation(kv, self.mesh, KEY_VALUE_SPEC)

    def __deepcopy__(self, memo: dict) -> SequenceLayout:
        return self  # immutable; a scan deep-copies its layer and must not copy the runtime


def place_sequence_layout(model: nn.Module, layout: SequenceLayout) -> int:
    """Give every attention module of `model` (those with a `sequence_layout` attribute) the
    layout; returns how many there were."""
    placed = 0
    for module in model.modules():
        if hasattr(module, "sequence_layout"):
            module.sequence_layout = layout
            placed += 1
    return placed


def splits_sequence(spec: PartitionSpec) -> bool:
    """Whether an activation spec [batch, sequence, ...] splits the sequence over context."""
    if len(spec) < 2 or spec[1] is None:
        return False
    return "context" in ((spec[1],) if isinstance(spec[1], str) else spec[1])


def context_problems(
    mesh: Mesh,
    seq_len: int,
    *,
    load_balance: bool,
    kernel: str,
    qkv_spec: PartitionSpec | None,
    num_heads: int,
    engine: str,
    sequence_split: bool,
) -> Problems:
    """What stops context parallelism from running as configured, each problem naming the keys
    and the numbers. `sequence_split`: the activation specs split the layers' sequence over
    context; `engine`: "xla", "torch.distributed" or "eager"."""
    found = Problems()
    n = context_size(mesh)
    axis = f"context={n} (ici_mesh.context={mesh.ici[-1]} x dcn_mesh.context={mesh.dcn[-1]})"
    pallas = kernel in TPU_KERNELS
    if pallas and qkv_spec is not None and qkv_spec[2] is not None:
        found.append(
            f"model.sharding.qkv={_show(qkv_spec)} splits the sequence (entry 2): torch_xla's "
            f"{kernel} kernel attends only within each device's shard; keep it null (with "
            "context parallelism put context on the heads entry)."
        )
    if n == 1:
        return found
    found.check(
        engine == "xla",
        f"{axis}: context parallelism runs on the XLA engine only; this run is on "
        f"{engine}. Set ici_mesh.context=1 and dcn_mesh.context=1.",
    )
    chunks = 2 * n if load_balance else n
    found.check(
        seq_len % chunks == 0,
        f"data.block_size={seq_len} does not split over {axis}"
        + (f" into model.load_balance_context's 2 x {n} = {chunks} chunks" if load_balance else "")
        + f": make it a multiple of {chunks}.",
    )
    found.check(
        sequence_split,
        f"{axis}, but model.sharding.activations leaves the layers' sequence whole, so every "
        "context device would compute the same tokens: use model/sharding=fsdp_cp (or "
        "fsdp_tp_cp), or put context on dimension 1 of model.layers.*.",
    )
    if pallas:
        found.check(
            not load_balance,
            f"model.load_balance_context=true with model.attention_kernel={kernel}: the "
            "kernel's causal mask follows the places in the tensor, not a reordered row; with "
            "context parallelism it splits heads over context, which is balanced already. Set "
            "model.load_balance_context=false.",
        )
        heads = qkv_spec[1] if qkv_spec is not None else None
        on_heads = heads == "context" or (isinstance(heads, tuple) and "context" in heads)
        found.check(
            on_heads,
            f"{axis} with model.attention_kernel={kernel}: the kernel runs on the whole "
            f"sequence, so it splits heads over context; model.sharding.qkv="
            f"{_show(qkv_spec)} does not (use e.g. [[data, fsdp], [tensor, context], null, "
            "null], as the *_cp presets do).",
        )
        ways = mesh.size(heads)
        found.check(
            not on_heads or num_heads % ways == 0,
            f"model.num_attention_heads={num_heads} does not split over the {ways} devices "
            f"of model.sharding.qkv's heads entry {_show_entry(heads)} ({axis}).",
        )
    return found


def _show_entry(entry) -> str:
    if entry is None or isinstance(entry, str):
        return str(entry).replace("None", "null")
    return "[" + ", ".join(entry) + "]"


def _show(spec: PartitionSpec | None) -> str:
    return "[" + ", ".join(_show_entry(e) for e in (spec or ())) + "]"
