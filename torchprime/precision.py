"""The precision policy: the dtype of the parameters (master weights), of the compute, and of
the optimizer state (`precision.*`).

float32 parameters with bfloat16 compute run the model's forward under autocast (XLA, CPU and
CUDA alike): matmuls and attention take bfloat16 copies of their operands, the weights and
their gradients stay float32, and the checkpoint holds them in float32. RMSNorm, the RoPE
tables, softmax and the loss are float32 whatever the policy (models/llama.py says where).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchprime.dtypes import DType
from torchprime.errors import Problems


@dataclass
class PrecisionConfig:
    """The dtypes of a run (MaxText's weight_dtype / dtype, torchtitan's mixed precision)."""

    params: DType = DType.float32
    """float32 or bfloat16: the parameters as stored, updated and checkpointed (the master
    weights)."""
    compute: DType | None = None
    """float32 or bfloat16: matmuls and activations. bfloat16 with float32 params runs the
    forward under autocast. null: the params' dtype. bfloat16 params with float32 compute is
    refused (the weights would only be rounded copies of what the compute needs)."""
    optimizer_state: DType | None = None
    """float32 or bfloat16: the AdamW moments; null: each parameter's dtype."""

    def problems(self, key: str = "precision") -> Problems:
        found = Problems()
        found.check(
            not (self.params == DType.bfloat16 and self.compute == DType.float32),
            f"{key}.params=bfloat16 with {key}.compute=float32 cannot work: the compute would "
            f"only see bfloat16 weights. Use {key}.params=float32 (bfloat16 compute optional) "
            f"or {key}.compute=bfloat16.",
        )
        return found


@dataclass(frozen=True)
class Precision:
    """A resolved policy, in torch dtypes."""

    params: torch.dtype
    compute: torch.dtype
    optimizer_state: torch.dtype | None

    @property
    def autocast(self) -> bool:
        """The compute runs in a narrower dtype than the parameters are kept in."""
        return self.compute != self.params

    def describe(self) -> str:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        state = name(self.optimizer_state) if self.optimizer_state else name(self.params)
        return (
            f"params {name(self.params)}, compute {name(self.compute)}"
            f"{' (autocast)' if self.autocast else ''}, optimizer state {state}"
        )


def resolve(cfg: PrecisionConfig, shorthand: DType | None = None) -> Precision:
    """The policy `cfg` gives; `shorthand` (the run's `dtype`) sets params and compute both."""
    params = shorthand or cfg.params
    compute = shorthand or cfg.compute or params
    state = cfg.optimizer_state
    return Precision(params.torch, compute.torch, state.torch if state else None)


def autocast(device_type: str, precision: Precision) -> contextlib.AbstractContextManager:
    """Autocast to the compute dtype when the policy needs it, else nothing."""
    if not precision.autocast:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=precision.compute)


def autocast_forward(model: nn.Module, precision: Precision, device_type: str) -> None:
    """Run `model`'s forward (and through autograd, the matching backward) under autocast.

    The class is swapped for a subclass of the same name, as the rewriting does, so parameter
    names, checkpoints and the HF export are unchanged.
    """
    if not precision.autocast:
        return
    cls = type(model)
    base_forward = cls.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with autocast(device_type, precision):
            return base_forward(self, *args, **kwargs)

    model.__class__ = type(
        cls.__name__, (cls,), {"forward": forward, "__qualname__": cls.__qualname__}
    )
