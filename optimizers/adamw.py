"""AdamW whose changing scalars are tensors, with optional clipping of the update.

On XLA every Python number that changes between steps is baked into the traced graph and forces
a recompilation. Here the step count and the bias corrections are device tensors, and the
learning rate may be one too (the trainer passes a tensor computed on the device), so every
step runs the same compiled graph.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch.optim import Optimizer

Number = Union[float, torch.Tensor]


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW, plus:

    - `update_clip`: clamp each element of the Adam update m̂ / (√v̂ + ε) to ±update_clip;
    - `update_rms_clip`: divide a tensor's update by max(1, RMS(update) / update_rms_clip),
      the per-tensor clipping of StableAdamW;
    - `state_dtype`: dtype of the moment estimates (None: the parameter's dtype).
    With both clips off it computes exactly what torch.optim.AdamW computes.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: Number = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        update_clip: Optional[float] = None,
        update_rms_clip: Optional[float] = None,
        state_dtype: Optional[torch.dtype] = None,
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

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = self.state_dtype or p.dtype
        return {
            # float32 on the parameter's device: counting in the graph, never on the host.
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, dtype=dtype),
            "exp_avg_sq": torch.zeros_like(p, dtype=dtype),
        }

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - as torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                update = self._adam_update(p.grad, state, beta1, beta2, group["eps"])
                if group["update_rms_clip"] is not None:
                    rms = update.float().pow(2).mean().sqrt()
                    update = update / (rms / group["update_rms_clip"]).clamp(min=1.0)
                if group["update_clip"] is not None:
                    update = update.clamp(-group["update_clip"], group["update_clip"])
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.sub_((update * lr).to(p.dtype))
        return loss

    @staticmethod
    def _adam_update(
        grad: torch.Tensor, state: dict[str, torch.Tensor], beta1: float, beta2: float, eps: float
    ) -> torch.Tensor:
        """Advance the moments and return m̂ / (√v̂ + ε) in the moments' dtype."""
        exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        step.add_(1)
        grad = grad.to(exp_avg.dtype)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        return (exp_avg / bias_correction1) / denom
