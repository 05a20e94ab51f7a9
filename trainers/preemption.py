"""SIGTERM (what a TPU VM receives before preemption) ends the run after the current step,
saved, instead of killing it mid-step; every host stops after the same step."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from trainers.hosts import any_host

log = logging.getLogger(__name__)


class Preemption:
    """Notes SIGTERM instead of dying at once, so the loop can finish the step and save."""

    def __init__(self):
        self._received = False
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self._received = True
        log.warning("SIGTERM received: finishing the current step, then saving and stopping")

    def requested(self) -> bool:
        """Whether any host received SIGTERM (every host gets the same answer: the save is
        collective, so all stop after the same step even when the signal reached some of them
        a step later)."""
        return any_host(self._received)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
