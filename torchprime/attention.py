"""The Pallas attention kernels of torch_xla (flash, splash): checks at start-up, dispatch on TPU.

Pallas kernels compile only for TPU. Asking for one elsewhere must fail before anything runs,
not at the first forward pass, so `check_attention_kernel` runs at start-up; `tpu_attention`
is what the model calls on TPU. A kernel runs shard by shard on the mesh: the model does not
know the mesh, so `place_kernels` hands it (and the q/k/v spec of `model.sharding.qkv`) to the
model's attention modules from outside. torch_xla is imported inside the functions that run
there.

Sequences are padded up to the kernels' block sizes (a causal model never attends to the
padding, which comes after every real token) and the output is cut back. Packed documents
reach the kernels as segment ids, through their own arguments (flash: q_segment_ids and
kv_segment_ids; splash: decoder_segment_ids), never as a [T, T] bias.

With context parallelism the kernels split heads over `context` (model.sharding.qkv puts it
on the heads entry): each device runs the kernel on the whole sequence for its heads. torch_xla
2.9's kernels cannot take a query shard with the keys of the whole sequence (their causal
mask starts both at 0, and splash refuses a sequence split), so the all-gather of keys and
values is the eager/sdpa path's (torchprime/context.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from torchprime.errors import ConfigError
from torchprime.mesh import Mesh, PartitionSpec

if TYPE_CHECKING:
    from torchprime.backend.base import Backend


class AttentionKernel(StrEnum):
    """`model.attention_kernel`."""

    eager = "eager"
    """The math written out: the reference the others match."""
    sdpa = "sdpa"
    """torch.nn.functional.scaled_dot_product_attention."""
    flash = "flash"
    """torch_xla's Pallas flash attention (TPU only)."""
    splash = "splash"
    """torch_xla's Pallas splash attention (TPU only)."""


TPU_KERNELS = (AttentionKernel.flash, AttentionKernel.splash)
#: Block sizes each kernel takes (its defaults in torch_xla 2.9), settable by
#: model.attention_block_sizes.
BLOCK_SIZES = {
    "flash": {
        "block_q": 512,
        "block_k_major": 512,
        "block_k": 512,
        "block_b": 2,
        "block_q_major_dkv": 512,
        "block_k_major_dkv": 512,
        "block_q_dkv": 512,
        "block_k_dkv": 512,
        "block_q_dq": 1024,
        "block_k_dq": 256,
        "block_k_major_dq": 512,
    },
    "splash": {
        "sa_block_q": 2048,
        "sa_block_kv": 2048,
        "sa_block_kv_compute": 2048,
        "sa_block_q_dkv": 2048,
        "sa_block_kv_dkv": 2048,
        "sa_block_kv_dkv_compute": 2048,
        "sa_block_q_dq": 2048,
        "sa_block_kv_dq": 2048,
    },
}
#: The sequence (lane) granularity of the TPU kernels.
LANE = 128


@dataclass(frozen=True)
class KernelPlacement:
    """Where a Pallas kernel runs: the mesh, and the spec of its [batch, heads, sequence,
    head_dim] q, k and v (each device runs the kernel on its own shard)."""

    backend: Backend
    mesh: Mesh
    qkv_spec: PartitionSpec

    def __deepcopy__(self, memo: dict) -> KernelPlacement:
        return self  # immutable; a scan deep-copies its layer and must not copy the runtime


def place_kernels(model: nn.Module, placement: KernelPlacement) -> int:
    """Give every attention module of `model` (those with a `kernel_placement` attribute) the
    placement its Pallas kernel runs with; returns how many there were."""
    placed = 0
    for module in model.modules():
        if hasattr(module, "kernel_placement"):
            module.kernel_placement = placement
            placed += 1
    return placed


def block_sizes(kernel: str, overrides: dict[str, int]) -> dict[str, int]:
    return {**BLOCK_SIZES[kernel], **overrides}


def padded_length(kernel: str, sizes: dict[str, int], seq_len: int) -> int:
    """The sequence length the kernel runs at: a multiple of its q/kv blocks (or of the lane
    width when the sequence is shorter than a block)."""
    if kernel == "flash":
        block = max(sizes["block_q"], sizes["block_k_major"])
    else:
        block = max(sizes["sa_block_q"], sizes["sa_block_kv"])
    unit = block if seq_len >= block else LANE
    return math.ceil(seq_len / unit) * unit


def check_attention_kernel(
    kernel: str,
    overrides: dict[str, int],
    device_kind: str,
    is_causal: bool,
    seq_len: int,
    uses_bias: bool,
    key: str = "model",
) -> None:
    """Everything that would stop a kernel on the device, said before the run starts.
    `seq_len` is the sequence each device's kernel runs on; `uses_bias`: an additive
    attention bias is passed (segment ids are not a bias: every kernel takes them)."""
    if kernel not in TPU_KERNELS:
        if overrides:
            raise ConfigError(
                f"{key}.attention_block_sizes is set but {key}.attention_kernel={kernel!r} "
                f"takes no block sizes (they are for {', '.join(TPU_KERNELS)})."
            )
        return
    if not device_kind.startswith("TPU"):
        raise ConfigError(
            f"{key}.attention_kernel={kernel!r} is a Pallas kernel that runs only on TPU; this "
            f"run's devices are {device_kind}. Use {key}.attention_kernel=sdpa (or eager) here."
        )
    unknown = sorted(set(overrides) - set(BLOCK_SIZES[kernel]))
    if unknown:
        raise ConfigError(
            f"{key}.attention_block_sizes: {', '.join(unknown)} not known to {kernel}; it takes "
            f"{', '.join(BLOCK_SIZES[kernel])}."
        )
    sizes = block_sizes(kernel, overrides)
    for name, size in sizes.items():
        granule = 1 if name == "block_b" else LANE
        if size < 1 or size % granule:
            raise ConfigError(
                f"{key}.attention_block_sizes.{name}={size}: must be a positive multiple of "
                f"{granule}."
            )
    if kernel == "splash" and uses_bias:
        raise ConfigError(
            f"{key}.attention_kernel=splash takes no elementwise attention bias; use flash, "
            "or express the mask as segment ids."
        )
    if not is_causal and padded_length(kernel, sizes, seq_len) != seq_len:
        raise ConfigError(
            f"{key}: a bidirectional model on {kernel} needs a sequence length the blocks "
            f"divide; {seq_len} would be padded to {padded_length(kernel, sizes, seq_len)} and "
            "the padding attended to. Change data.block_size or the block sizes."
        )


def tpu_attention(
    kernel: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    bias: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    overrides: dict[str, int],
    placement: KernelPlacement | None,
) -> torch.Tensor:
    """softmax(q kᵀ / √D + bias) v on a TPU kernel; q, k, v: [B, H, T, D], same head count;
    segment_ids [B, T] (packed documents) through the kernel's own segment-id arguments."""
    if placement is None:
        raise RuntimeError(
            f"attention_kernel={kernel}: the kernel runs on a mesh, and this model was given "
            "none (torchprime.attention.place_kernels; the trainer does it)."
        )
    sizes = block_sizes(kernel, overrides)
    T = q.shape[2]
    padded = padded_length(kernel, sizes, T)
    if padded != T:
        q, k, v = (F.pad(t, (0, 0, 0, padded - T)) for t in (q, k, v))
        if bias is not None:
            bias = F.pad(bias, (0, padded - T, 0, padded - T))
        if segment_ids is not None:
            # The padding is a segment of its own: no real token attends to it.
            segment_ids = F.pad(segment_ids, (0, padded - T), value=-1)
    mesh = placement.backend.xla_mesh(placement.mesh)
    if segment_ids is not None:
        segment_ids = segment_ids.to(torch.int32)  # the kernels' index type
    if kernel == "flash":
        out = _flash(q, k, v, is_causal, bias, segment_ids, sizes, mesh, placement.qkv_spec)
    else:
        out = _splash(q, k, v, is_causal, segment_ids, sizes, mesh, placement.qkv_spec)
    return out[:, :, :T]


def _flash(q, k, v, is_causal, bias, segment_ids, sizes, mesh, spec):
    from torch_xla.experimental.custom_kernel import FlashAttention, flash_attention

    # torch_xla reads the block sizes from this class attribute at trace time.
    FlashAttention.DEFAULT_BLOCK_SIZES = dict(sizes)
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).to(q.dtype)
    return flash_attention(
        q,
        k,
        v,
        causal=is_causal,
        q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids,
        sm_scale=1.0 / math.sqrt(q.shape[-1]),
        ab=bias,
        partition_spec=spec,
        mesh=mesh,
    )


def _splash(q, k, v, is_causal, segment_ids, sizes, mesh, spec):
    from torch_xla.experimental.splash_attention import SplashAttentionConfig, splash_attention

    config = SplashAttentionConfig(
        mesh=str(mesh),
        qkv_partition_spec=spec,
        segment_ids_partition_spec=(spec[0], spec[2]),
        **sizes,
    )
    # The kernel does not scale the scores itself.
    return splash_attention(
        q / math.sqrt(q.shape[-1]),
        k,
        v,
        config.to_json(),
        decoder_segment_ids=segment_ids,
        causal=is_causal,
    )
