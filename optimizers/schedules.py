"""Learning-rate schedules as functions of the step *tensor*, so the lr lives on the device
and changing it never recompiles the XLA graph."""

from __future__ import annotations

import math

import torch

from torchprime.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear")


def lr_multiplier(
    step: torch.Tensor, name: str, warmup_steps: int, max_steps: int, min_lr_ratio: float
) -> torch.Tensor:
    """Factor on the peak lr for the 0-based `step`: linear warmup over `warmup_steps`, then
    constant, cosine or linear decay to `min_lr_ratio` at `max_steps`."""
    s = step.float()
    warmup = torch.clamp((s + 1) / warmup_steps, max=1.0) if warmup_steps else torch.ones_like(s)
    progress = torch.clamp((s - warmup_steps) / max(1, max_steps - warmup_steps), 0.0, 1.0)
    if name == "constant":
        decay = torch.ones_like(s)
    elif name == "cosine":
        decay = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + torch.cos(math.pi * progress))
    elif name == "linear":
        decay = min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    else:
        raise ConfigError(
            f"trainer.lr_scheduler.name={name!r}: choose one of {', '.join(SCHEDULES)}."
        )
    return warmup * decay
