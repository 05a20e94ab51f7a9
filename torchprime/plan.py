"""The sharding plan: what each device will hold, computed on the meta device without a TPU.

For every parameter: its spec and the shape of one device's shard. Per device: the bytes of
parameters, gradients and optimizer state (AdamW: two moments, plus a step counter), with
totals. Activations are not counted: they depend on batch, sequence, remat and the compiler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from torchprime.mesh import Mesh, PartitionSpec

#: Optimizer state tensors of AdamW per parameter, each the parameter's shape.
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class ParameterPlan:
    name: str
    shape: tuple[int, ...]
    spec: PartitionSpec
    shard_shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def shard_numel(self) -> int:
        return math.prod(self.shard_shape)

    @property
    def shard_bytes(self) -> int:
        return self.shard_numel * self.dtype.itemsize


@dataclass(frozen=True)
class ShardingPlan:
    mesh: Mesh
    parameters: list[ParameterPlan]
    parameter_bytes: int
    """Per device."""
    gradient_bytes: int
    """Per device (gradients take the parameters' layout and dtype)."""
    optimizer_bytes: int
    """Per device."""

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def total_parameters(self) -> int:
        return sum(math.prod(p.shape) for p in self.parameters)


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> tuple[int, ...]:
    return tuple(math.ceil(size / mesh.size(entry)) for size, entry in zip(shape, spec))


def make_plan(
    model: nn.Module,
    specs: dict[str, PartitionSpec],
    mesh: Mesh,
    optimizer_state_dtype: torch.dtype | None = None,
) -> ShardingPlan:
    """The plan for `model` (on the meta device, or anywhere) laid out by `specs`.

    `optimizer_state_dtype`: dtype of the AdamW moments (None: each parameter's dtype).
    Tied parameters are counted once.
    """
    plans = [
        ParameterPlan(
            name,
            tuple(p.shape),
            specs[name],
            shard_shape(tuple(p.shape), specs[name], mesh),
            p.dtype,
        )
        for name, p in model.named_parameters()
    ]
    parameter_bytes = sum(p.shard_bytes for p in plans)
    state_bytes = sum(
        ADAM_MOMENTS * p.shard_numel * (optimizer_state_dtype or p.dtype).itemsize
        + torch.float32.itemsize  # the step counter
        for p in plans
    )
    return ShardingPlan(mesh, plans, parameter_bytes, parameter_bytes, state_bytes)


@dataclass(frozen=True)
class FitVerdict:
    fits: bool
    text: str


def fit_verdict(
    plan: ShardingPlan, hbm_bytes: float, where: str, activation_bytes: int | None = None
) -> FitVerdict:
    """Whether parameters, gradients and optimizer state fit in one chip's memory, and with
    `activation_bytes` (an estimate) whether the activations fit beside them."""
    used = plan.total_bytes
    if used > hbm_bytes:
        return FitVerdict(
            False,
            f"DOES NOT FIT: parameters + gradients + optimizer state need {format_bytes(used)} "
            f"per device, more than the {format_bytes(hbm_bytes)} of {where} "
            f"({used / hbm_bytes:.0%}). Shard wider (more fsdp or tensor), use bfloat16 "
            "parameters or precision.optimizer_state=bfloat16, or a larger chip.",
        )
    if activation_bytes is None:
        return FitVerdict(
            True,
            f"fits: {format_bytes(used)} of {format_bytes(hbm_bytes)} on {where} "
            f"({used / hbm_bytes:.0%}), {format_bytes(hbm_bytes - used)} left for activations "
            "and compiler buffers.",
        )
    total = used + activation_bytes
    figures = (
        f"{format_bytes(used)} of weights, gradients and optimizer state + about "
        f"{format_bytes(activation_bytes)} of activations (estimate) = {format_bytes(total)} "
        f"of {format_bytes(hbm_bytes)} on {where} ({total / hbm_bytes:.0%})"
    )
    if total > hbm_bytes:
        return FitVerdict(
            False,
            f"LIKELY OUT OF MEMORY: {figures}. Recompute or offload more (model/remat="
            "scan_remat or scan_offload), fewer rows per device (more "
            "trainer.grad_accum_steps), or shard wider.",
        )
    return FitVerdict(True, f"fits: {figures}.")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _show_spec(spec: PartitionSpec) -> str:
    parts = [
        "-" if e is None else e if isinstance(e, str) else "(" + ",".join(e) + ")" for e in spec
    ]
    return "[" + ", ".join(parts) + "]"


def expert_parameters(plan: ShardingPlan) -> list[ParameterPlan]:
    """The stacked expert weights of a mixture-of-experts model ([experts, ...] tensors of
    an `experts` module)."""
    return [p for p in plan.parameters if ".experts." in f".{p.name}"]


def _expert_lines(plan: ShardingPlan) -> list[str]:
    """Of the parameters, the experts' weights, and how many experts a device holds."""
    experts = expert_parameters(plan)
    if not experts:
        return []
    total, held = experts[0].shape[0], experts[0].shard_shape[0]
    nbytes = sum(p.shard_bytes for p in experts)
    return [
        f"      of which experts {format_bytes(nbytes):>10}  (parts of {held} of the {total} "
        "experts of each layer)"
    ]


def format_plan(plan: ShardingPlan, max_rows: int = 40) -> str:
    """A table of parameters (the largest first, `max_rows` of them) and the per-device totals."""
    rows = sorted(plan.parameters, key=lambda p: -p.shard_bytes)
    width = max([len(p.name) for p in rows[:max_rows]] + [9])
    lines = [
        f"sharding plan on mesh {plan.mesh.describe()} ({plan.mesh.num_devices} devices), "
        f"{plan.total_parameters / 1e9:.3f}B parameters",
        f"  {'parameter':<{width}}  {'shape':<18} {'spec':<22} {'shard':<18} {'per device':>12}",
    ]
    for p in rows[:max_rows]:
        lines.append(
            f"  {p.name:<{width}}  {str(list(p.shape)):<18} {_show_spec(p.spec):<22} "
            f"{str(list(p.shard_shape)):<18} {format_bytes(p.shard_bytes):>12}"
        )
    if len(rows) > max_rows:
        lines.append(f"  ... and {len(rows) - max_rows} more parameters")
    lines += [
        "  per device:",
        f"    parameters       {format_bytes(plan.parameter_bytes):>12}",
        *_expert_lines(plan),
        f"    gradients        {format_bytes(plan.gradient_bytes):>12}",
        f"    optimizer state  {format_bytes(plan.optimizer_bytes):>12}",
        f"    total            {format_bytes(plan.total_bytes):>12}  (activations not counted)",
    ]
    return "\n".join(lines)
