"""Loss-spike skipping (`trainer.spike`): a step whose loss or gradient norm jumps far above its
running statistics is skipped like a step with non-finite gradients (parameters, moments and
the optimizer's step count unchanged, counted in `skipped_steps`).

The statistics are an exponential moving average of each signal and of its variance, kept as
device tensors and updated inside the step's graph: the decision costs no host round trip and
changes no Python value, so on XLA every step runs the same compiled graph. They are part of
a checkpoint, so a resumed run decides exactly as the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchprime.errors import Problems

#: The signals watched, in the order of their metrics.
SIGNALS = ("loss", "grad_norm")


@dataclass
class SpikeConfig:
    """Skip steps whose loss or gradient norm (before clipping) exceeds its running mean by
    more than `z_threshold` running standard deviations."""

    enabled: bool = False
    """Off by default: a skipped step is a decision about the data that a user should opt into
    (and its statistics change the checkpoint's contents)."""
    z_threshold: float = 6.0
    """A step is a spike when (value - mean) / std > z_threshold for the loss or the grad norm
    (one-sided: a falling loss is never skipped)."""
    warmup_steps: int = 50
    """Steps observed before any step may be skipped (the statistics settle first)."""
    ema_decay: float = 0.99
    """Decay of the moving mean and variance: they follow about 1 / (1 - ema_decay) steps."""
    std_floor: float = 0.01
    """The standard deviation used is at least std_floor × the mean, so a signal that has
    hardly moved (a near-zero variance) does not make tiny wobbles spikes."""

    def problems(self, key: str = "trainer.spike") -> Problems:
        found = Problems()
        found.check(
            self.z_threshold > 0, f"{key}.z_threshold={self.z_threshold}: must be positive."
        )
        found.check(
            self.warmup_steps >= 1, f"{key}.warmup_steps={self.warmup_steps}: must be at least 1."
        )
        found.check(0 < self.ema_decay < 1, f"{key}.ema_decay={self.ema_decay}: must be in (0, 1).")
        found.check(self.std_floor >= 0, f"{key}.std_floor={self.std_floor}: must be 0 or more.")
        return found


class SpikeDetector:
    """The running statistics of the loss and the grad norm, and the skip decision."""

    def __init__(self, cfg: SpikeConfig, device: torch.device):
        self.cfg = cfg

        def zero(dtype=torch.float32):
            return torch.zeros((), dtype=dtype, device=device)

        self.observed = zero()
        """Finite steps seen (a float: it is an exponent of the bias correction)."""
        self.mean = {s: zero() for s in SIGNALS}
        self.var = {s: zero() for s in SIGNALS}
        self.skips = {s: zero(torch.int32) for s in SIGNALS}
        """Steps skipped because this signal spiked (cumulative)."""
        self.z = {s: zero() for s in SIGNALS}
        """The last step's z-score of each signal (0 before warm-up), for the metrics."""

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint carries (a load writes into them)."""
        return {
            "observed": self.observed,
            **{f"{s}_mean": self.mean[s] for s in SIGNALS},
            **{f"{s}_var": self.var[s] for s in SIGNALS},
            **{f"{s}_skips": self.skips[s] for s in SIGNALS},
        }

    def metrics(self) -> dict[str, torch.Tensor]:
        return {
            **{f"{s}_z": self.z[s] for s in SIGNALS},
            **{f"{s}_spike_skips": self.skips[s] for s in SIGNALS},
        }

    @torch.no_grad()
    def check(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, nonfinite: torch.Tensor
    ) -> torch.Tensor:
        """Whether this step is a spike (a boolean device tensor), and the statistics advanced.

        Statistics take each value clipped to the spike limit: one wild step barely moves
        them, while a lasting shift (a new data mixture) moves them within a few dozen steps,
        so a run is not stuck skipping forever. A non-finite step (skipped anyway) is not
        observed at all."""
        cfg = self.cfg
        values = {"loss": loss.detach().float(), "grad_norm": grad_norm.detach().float()}
        bad = nonfinite
        for v in values.values():
            bad = bad | ~torch.isfinite(v)
        good = ~bad
        warm = self.observed >= cfg.warmup_steps
        first = self.observed == 0
        # The EMA variance starts at 0: divided by 1 - decay^(n - 1) it is unbiased.
        correction = 1 - torch.pow(cfg.ema_decay, (self.observed - 1).clamp(min=1))
        spikes = {}
        for s, x in values.items():
            mean, var = self.mean[s], self.var[s]
            std = torch.maximum((var / correction).sqrt(), cfg.std_floor * mean.abs())
            limit = mean + cfg.z_threshold * std
            spikes[s] = warm & good & (x > limit)
            z = (x - mean) / std.clamp(min=torch.finfo(torch.float32).tiny)
            self.z[s].copy_(torch.where(warm & good, z, torch.zeros_like(z)))
            seen = torch.where(warm, torch.minimum(x, limit), x)
            delta = seen - mean
            d = cfg.ema_decay
            new_mean = torch.where(first, seen, mean + (1 - d) * delta)
            new_var = torch.where(first, torch.zeros_like(var), d * (var + (1 - d) * delta * delta))
            mean.copy_(torch.where(good, new_mean, mean))
            var.copy_(torch.where(good, new_var, var))
        spike = spikes["loss"] | spikes["grad_norm"]
        for s in SIGNALS:
            self.skips[s].add_(spikes[s].to(torch.int32))
        self.observed.add_(good.to(torch.float32))
        return spike
