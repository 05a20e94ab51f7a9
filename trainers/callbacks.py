"""Things that watch the training loop at fixed points of a step (profiler, graph dumper, and
whatever a caller adds): the loop calls every callback, in order, at each point."""

from __future__ import annotations

from typing import Protocol

import torch


class StepCallback(Protocol):
    def step_begins(self, step: int) -> None:
        """Before the step's batches are taken."""

    def before_sync(self, step: int, tensors: list[torch.Tensor]) -> None:
        """The step is traced (on XLA, not yet run); `tensors` are its outputs (the loss,
        then the parameters)."""

    def step_done(self, step: int) -> None:
        """The step ran (on XLA, launched)."""

    def close(self) -> None:
        """The loop ended, normally or not."""


class Callback:
    """A StepCallback that does nothing at every point: subclass and override what you need."""

    def step_begins(self, step: int) -> None:
        pass

    def before_sync(self, step: int, tensors: list[torch.Tensor]) -> None:
        pass

    def step_done(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
