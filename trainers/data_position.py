"""The data position a checkpoint saves: that of the last batch the training step consumed.

The device loader reads batches ahead of the step (prefetching), so the pipeline's own state
is already past the batches in flight. `TrackedBatches` snapshots the pipeline's state after
each batch it produces and drops the snapshots as the loop consumes batches; what a checkpoint
saves is the snapshot of the last consumed one, so a resumed run reads exactly the batches the
interrupted one never trained on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class TrackedBatches:
    """Wraps the host's batch stream (anything iterable; `state_dict()` / `load_state_dict()`
    are used when it has them)."""

    def __init__(self, batches: Iterable[Any]):
        self.batches = batches
        self.stateful = hasattr(batches, "state_dict") and hasattr(batches, "load_state_dict")
        self.consumed = 0
        self._skip = 0  # batches to read and drop at the start (resuming a stateless stream)
        self._lock = threading.Lock()  # the device loader produces from its own thread
        self._snapshots: deque[tuple[int, Any]] = deque([(0, self._pipeline_state())])

    def _pipeline_state(self) -> Any:
        return self.batches.state_dict() if self.stateful else None

    def __iter__(self) -> Iterator[Any]:
        produced = self.consumed
        it = iter(self.batches)
        for _ in range(self._skip):
            next(it)
        for batch in it:
            produced += 1
            state = self._pipeline_state()
            with self._lock:
                self._snapshots.append((produced, state))
            yield batch

    def mark_consumed(self, n: int = 1) -> None:
        """The training loop took `n` more batches."""
        with self._lock:
            self.consumed += n
            while len(self._snapshots) > 1 and self._snapshots[1][0] <= self.consumed:
                self._snapshots.popleft()

    def state_dict(self) -> dict[str, Any]:
        """JSON: batches consumed so far, and the pipeline's state after the last of them."""
        with self._lock:
            index, state = self._snapshots[0]
        assert index == self.consumed, (index, self.consumed)
        return {"batches_consumed": self.consumed, "data": state}

    def load_state_dict(self, record: dict[str, Any]) -> None:
        """Continue after `record["batches_consumed"]` batches: from the saved pipeline state
        when there is one, else by reading and dropping that many batches (deterministic
        streams only; slower). `record["hosts"]`, every host's record (trainers/checkpoint.py),
        gives the pipeline the positions all hosts saved: each reads the logical shards it
        owns now, whichever host saved them, so a run resumes on another host count."""
        consumed = int(record.get("batches_consumed", 0))
        hosts = record.get("hosts") or [record]
        states = [h["data"] for h in hosts if h.get("data") is not None]
        if self.stateful and states:
            self.batches.load_state_dict(states[0] if len(states) == 1 else states)
            self._skip = 0
            state = self._pipeline_state()  # this host's part of what was loaded
        else:
            if consumed:
                log.warning(
                    "data: the checkpoint has no data position for this pipeline; skipping "
                    "the %d batches already trained on by reading them again",
                    consumed,
                )
            self._skip = consumed
            state = None
        self.consumed = consumed
        self._snapshots = deque([(consumed, state)])
