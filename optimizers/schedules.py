"""Learning-rate schedules as functions of the step *tensor*, so the lr lives on the device
and changing it never recompiles the XLA graph."""

from __future__ import annotations

import math
from enum import StrEnum

import torch

from torchprime.errors import ConfigError


class ScheduleName(StrEnum):
    """`trainer.lr_scheduler.name`: the decay after the linear warmup."""

    constant = "constant"
    cosine = "cosine"
    linear = "linear"
    wsd = "wsd"


#: wsd's decay phase when neither decay_steps nor decay_fraction is given.
DEFAULT_DECAY_FRACTION = 0.1


def wsd_decay_steps(
    max_steps: int, warmup_steps: int, decay_steps: int | None, decay_fraction: float | None
) -> int:
    """Length of wsd's final decay, checked against the run (errors name the keys)."""
    key = "trainer.lr_scheduler"
    if decay_steps is not None and decay_fraction is not None:
        raise ConfigError(
            f"{key}.decay_steps={decay_steps} and {key}.decay_fraction={decay_fraction}: "
            "give one of them, not both."
        )
    if decay_steps is None:
        fraction = DEFAULT_DECAY_FRACTION if decay_fraction is None else decay_fraction
        if not 0 < fraction <= 1:
            raise ConfigError(f"{key}.decay_fraction={fraction}: must be in (0, 1].")
        decay_steps = max(1, round(fraction * max_steps))
    if not 1 <= decay_steps <= max_steps - warmup_steps:
        raise ConfigError(
            f"{key}.decay_steps={decay_steps}: must be between 1 and trainer.max_steps - "
            f"{key}.warmup_steps = {max_steps} - {warmup_steps} = {max_steps - warmup_steps}."
        )
    return decay_steps


def lr_multiplier(
    step: torch.Tensor,
    name: str,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float,
    decay_steps: int | None = None,
    decay_fraction: float | None = None,
) -> torch.Tensor:
    """Factor on the peak lr for the 0-based `step`: linear warmup over `warmup_steps`, then

    - constant: the peak;
    - cosine, linear: decay to `min_lr_ratio` at `max_steps`;
    - wsd (warmup-stable-decay): the peak until the last `decay_steps` steps (or the last
      `decay_fraction` of max_steps; default 0.1), then linear decay to `min_lr_ratio`, reached
      at `max_steps`.
    """
    s = step.float()
    warmup = torch.clamp((s + 1) / warmup_steps, max=1.0) if warmup_steps else torch.ones_like(s)
    progress = torch.clamp((s - warmup_steps) / max(1, max_steps - warmup_steps), 0.0, 1.0)
    if name == "constant":
        decay = torch.ones_like(s)
    elif name == "cosine":
        decay = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + torch.cos(math.pi * progress))
    elif name == "linear":
        decay = min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    elif name == "wsd":
        n = wsd_decay_steps(max_steps, warmup_steps, decay_steps, decay_fraction)
        into_decay = torch.clamp((s - (max_steps - n)) / n, 0.0, 1.0)
        decay = min_lr_ratio + (1 - min_lr_ratio) * (1 - into_decay)
    else:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(ScheduleName)}")
    return warmup * decay
