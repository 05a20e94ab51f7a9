"""AdamW whose changing scalars are tensors, with optional clipping of the update and skipping
of steps whose gradients are not finite.

On XLA every Python number that changes between steps is baked into the traced graph and forces
a recompilation. Here the step count and the bias corrections are device tensors, and the
learning rate may be one too (the trainer passes a tensor computed on the device), so every
step runs the same compiled graph. For the same reason a step is skipped without asking the
host: the decision is a device tensor and `torch.where` keeps the old values.

Eager devices (CPU, CUDA) have no graph to keep stable, and there the out-of-place update with
`torch.where` costs several extra passes over every parameter-sized tensor (3x the time of
torch.optim.AdamW on a CPU). So off XLA the skip decision is read on the host, and the update
is torch.optim.AdamW's fused kernel (one pass over each tensor), or with clipping or moments in
another dtype an in-place update: the same numbers either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw

Number = float | torch.Tensor
#: layout(new_tensor, param): give a state tensor the layout (sharding) of its parameter.
Layout = Callable[[torch.Tensor, torch.Tensor], None]


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW, plus:

    - `update_clip`: clamp each element of the Adam update m̂ / (√v̂ + ε) to ±update_clip;
    - `update_rms_clip`: divide a tensor's update by max(1, RMS(update) / update_rms_clip),
      the per-tensor clipping of StableAdamW;
    - `state_dtype`: dtype of the moment estimates (None: the parameter's dtype);
    - `traced`: the step is traced into one graph (XLA): updates out of place, the skip
      decided on the device; otherwise (eager devices) in place, the skip read on the host;
    - `step(skip=...)`: a boolean device tensor; where it is true the step changes nothing
      (parameters, moments and step count keep their values) and is counted in
      `skipped_steps` and `consecutive_skips` (device tensors, reset by the next real step).
    After each step `update_clip_fraction` is a device tensor (None when no clip is set): the
    fraction of update elements clamped by `update_clip` when that is set, otherwise the
    fraction of tensors scaled down by `update_rms_clip`.
    With both clips off it computes exactly what torch.optim.AdamW computes.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: Number = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        update_clip: float | None = None,
        update_rms_clip: float | None = None,
        state_dtype: torch.dtype | None = None,
        traced: bool = False,
    ):
        for name, value in (("update_clip", update_clip), ("update_rms_clip", update_rms_clip)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            update_clip=update_clip,
            update_rms_clip=update_rms_clip,
        )
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self.traced = traced
        device = self.param_groups[0]["params"][0].device
        # Counted on the device (int32): reading them would cost a host round trip per step.
        self.skipped_steps = torch.zeros((), dtype=torch.int32, device=device)
        self.consecutive_skips = torch.zeros((), dtype=torch.int32, device=device)
        self.update_clip_fraction: torch.Tensor | None = None

    def _init_state(self, p: torch.Tensor, layout: Layout | None = None) -> dict[str, torch.Tensor]:
        dtype = self.state_dtype or p.dtype
        state = {
            # float32 on the parameter's device: counting in the graph, never on the host.
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, dtype=dtype),
            "exp_avg_sq": torch.zeros_like(p, dtype=dtype),
        }
        if layout is not None:
            layout(state["exp_avg"], p)
            layout(state["exp_avg_sq"], p)
        return state

    def init_state(self, layout: Layout | None = None) -> None:
        """Create every parameter's state now (else the first step creates it).

        On XLA this keeps the first step's graph the same as every later one (one compilation
        instead of two), and gives checkpoints tensors to load into; `layout` lays each moment
        out like its parameter (a sharded parameter gets sharded moments).
        """
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p].update(self._init_state(p, layout))

    def counters(self) -> dict[str, torch.Tensor]:
        """The device tensors a checkpoint must carry besides the per-parameter state."""
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    @property
    def in_place(self) -> bool:
        """Update parameters and moments in place, skipping on the host (eager devices),
        rather than as one traced graph with the skip on the device (XLA)."""
        return not self.traced

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first = self.param_groups[0]["params"][0]
        counted = False
        if skip is not None and self.in_place:
            # A host read: free on the CPU, one synchronization on CUDA.
            self._count_skip(skip)
            if bool(skip):
                if any(
                    g["update_clip"] is not None or g["update_rms_clip"] is not None
                    for g in self.param_groups
                ):
                    # What the device path reports for a skipped (non-finite) update.
                    self.update_clip_fraction = torch.zeros((), device=first.device)
                return loss
            skip, counted = None, True
        clipped, clip_total = [], 0
        for group in self.param_groups:
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            clips = group["update_clip"] is not None or group["update_rms_clip"] is not None
            if not clips and self._fused_step(group):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                new_state = None
                if self.in_place:
                    sqrt_v, bias_correction2_sqrt = self._moments_in_place(
                        p.grad, state, beta1, beta2
                    )
                    if group["weight_decay"]:
                        p.mul_(1 - lr * group["weight_decay"])
                    bias_correction1 = 1 - torch.pow(beta1, state["step"])
                    denom = sqrt_v.div_(bias_correction2_sqrt).add_(group["eps"])
                    update = (state["exp_avg"] / bias_correction1) / denom
                else:
                    update, new_state = self._adam_update(p.grad, state, beta1, beta2, group["eps"])
                if group["update_rms_clip"] is not None:
                    rms = update.float().pow(2).mean().sqrt()
                    scale = (rms / group["update_rms_clip"]).clamp(min=1.0)
                    update = update / scale
                    if group["update_clip"] is None:
                        clipped.append((scale > 1.0).float())
                        clip_total += 1
                if group["update_clip"] is not None:
                    clipped.append((update.abs() > group["update_clip"]).sum().float())
                    clip_total += update.numel()
                    update = update.clamp(-group["update_clip"], group["update_clip"])
                if new_state is None:  # in place: weight decay and moments are applied already
                    p.sub_((update * lr).to(p.dtype))
                    continue
                new_p = p
                if group["weight_decay"]:
                    new_p = p * (1 - lr * group["weight_decay"])
                new_p = new_p - (update * lr).to(p.dtype)
                new_state["param"] = new_p
                for key, new in new_state.items():
                    old = p if key == "param" else state[key]
                    old.copy_(new if skip is None else torch.where(skip, old, new))
        if skip is not None and not counted:
            self._count_skip(skip)
        if clipped:
            # clip_total is fixed by the parameter shapes: a constant of the graph.
            self.update_clip_fraction = torch.stack(clipped).sum() / clip_total
        return loss

    def _fused_step(self, group: dict[str, Any]) -> bool:
        """The group's step by torch.optim.AdamW's fused kernel (one pass over each tensor),
        where it applies: every parameter updated in place, no clipping (the kernel never
        materializes the update), moments in the parameters' dtype. Returns whether it ran."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params or not self.in_place:
            return False
        for p in params:
            if not self.state[p]:
                self.state[p].update(self._init_state(p))
        states = [self.state[p] for p in params]
        if any(s["exp_avg"].dtype != p.dtype for s, p in zip(states, params)):
            return False
        beta1, beta2 = group["betas"]
        for same in _by_layout(params):  # one kernel runs over tensors of one layout
            adamw(
                same,
                [p.grad for p in same],
                [self.state[p]["exp_avg"] for p in same],
                [self.state[p]["exp_avg_sq"] for p in same],
                [],
                [self.state[p]["step"] for p in same],
                fused=True,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
        return True

    def _count_skip(self, skip: torch.Tensor) -> None:
        skipped = skip.to(torch.int32)
        self.skipped_steps.add_(skipped)
        self.consecutive_skips.copy_((self.consecutive_skips + 1) * skipped)

    @staticmethod
    def _moments_in_place(
        grad: torch.Tensor, state: dict[str, torch.Tensor], beta1: float, beta2: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the step count and the moments in place; returns √v (a new tensor) and
        √(1 - beta2^step)."""
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"].add_(1)
        grad = grad.to(exp_avg.dtype)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return exp_avg_sq.sqrt(), (1 - torch.pow(beta2, state["step"])).sqrt()

    @staticmethod
    def _adam_update(
        grad: torch.Tensor, state: dict[str, torch.Tensor], beta1: float, beta2: float, eps: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """m̂ / (√v̂ + ε) in the moments' dtype, and the advanced moments and step count (not
        yet written to the state: a skipped step keeps the old ones)."""
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        step = state["step"] + 1
        grad = grad.to(exp_avg.dtype)
        exp_avg = exp_avg.lerp(grad, 1 - beta1)
        exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        update = (exp_avg / bias_correction1) / denom
        return update, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _by_layout(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`params` grouped by the device mesh they are laid out on (DTensors of tensor-parallel
    and of FSDP-only modules live on different meshes); one group for plain tensors."""
    groups: dict[int, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(id(getattr(p, "device_mesh", None)), []).append(p)
    return list(groups.values())
