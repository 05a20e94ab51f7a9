"""The checkpoint manager: one object owns saving, choosing what to resume from, loading, the
coordination of hosts around both, and pruning. The training loop only says "save step N" and
"restore"; it never touches a checkpoint folder.

What is saved comes from a `Stateful` part (the trainer): its tensors (model, optimizer state,
device counters), written with torch.distributed.checkpoint, and each host's JSON record (data
position, RNG states). The folder format is trainers/checkpoint.py's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torchprime.backend.base import Backend
from torchprime.errors import ConfigError
from trainers.async_checkpoint import AsyncSaver
from trainers.checkpoint import (
    CorruptCheckpoint,
    describe_incomplete,
    is_complete,
    load_checkpoint,
    save_checkpoint,
    step_dirs,
)
from trainers.config import CheckpointConfig
from trainers.hosts import (
    barrier,
    broadcast_from_coordinator,
    gather_from_hosts,
    is_coordinator,
)

log = logging.getLogger(__name__)


class Stateful(Protocol):
    """What a checkpoint holds of a run."""

    def checkpoint_tensors(self) -> dict[str, Any]:
        """Nested dicts of the live tensors (a load writes into them)."""

    def tensors_loaded(self, tensors: dict[str, Any]) -> None:
        """A load wrote into `tensors` (what `checkpoint_tensors` returned): put what were
        copies back into the live state."""

    def host_state(self) -> dict[str, Any]:
        """This host's JSON record: data position, RNG states."""

    def load_host_state(self, record: dict[str, Any]) -> None:
        """Put back what `host_state` returned (with "step" added)."""


@dataclass(frozen=True)
class Restored:
    path: Path
    step: int
    compiles: str
    """", N compilations" for the log (empty where nothing compiles)."""


class CheckpointManager:
    """Checkpoints of one run under `root` (output_dir/checkpoints)."""

    def __init__(self, cfg: CheckpointConfig, resume: str, root: Path, backend: Backend):
        self.cfg = cfg
        self.resume = resume
        """never, auto, or a checkpoint folder (trainer.resume)."""
        self.root = root
        self.backend = backend
        self.async_saver = AsyncSaver(root, backend, cfg.keep) if cfg.async_save else None
        """Writes checkpoints in the background (trainer.checkpoint.async_save), or None."""

    def should_save(self, step: int, max_steps: int) -> bool:
        if self.cfg.interval and step % self.cfg.interval == 0:
            return True
        return self.cfg.save_at_end and step == max_steps

    def save(self, step: int, state: Stateful) -> Path:
        """Save step `step`; returns its folder (with async_save: complete once `wait`ed)."""
        before = self.backend.compile_count()
        started = time.perf_counter()
        if self.async_saver is not None:
            path = self.async_saver.save(step, state.checkpoint_tensors(), state.host_state())
            log.info(
                "checkpoint: step %d saved to host memory, writing %s in the background "
                "(staged in %.2f s%s)",
                step,
                path,
                time.perf_counter() - started,
                self._compiles_since(before),
            )
            return path
        path = save_checkpoint(
            self.root,
            step,
            state.checkpoint_tensors(),
            self.backend,
            state.host_state(),
            keep=self.cfg.keep,
        )
        log.info(
            "checkpoint: step %d saved to %s (%.2f s%s)",
            step,
            path,
            time.perf_counter() - started,
            self._compiles_since(before),
        )
        return path

    def wait(self) -> None:
        """Until the checkpoint being written in the background (if any) is complete."""
        if self.async_saver is not None:
            self.async_saver.wait()

    def restore(self, state: Stateful) -> Restored | None:
        """Load the checkpoint `resume` asks for into `state`; None: start from step 0.

        auto: the newest complete checkpoint that every host can load (damaged ones are
        skipped with a warning naming them); checkpoints newer than the one loaded are set
        aside, so neither the next resume nor the pruning takes them for this run's."""
        if self.resume == "never":
            return None
        candidates = self._candidates()
        # The state's tensors may still be in flight (weights just placed, the optimizer's
        # state just made): XLA refuses to read a tensor's data while an op writes it.
        self.backend.wait_device_ops()
        failed = []
        for path in candidates:
            before = self.backend.compile_count()
            problem = None
            try:
                tensors = state.checkpoint_tensors()
                record = load_checkpoint(path, tensors, self.backend)
                state.tensors_loaded(tensors)
            except CorruptCheckpoint as e:
                problem = str(e)
            # One host that cannot load it is enough to skip it on all of them.
            problem = next((p for p in gather_from_hosts(problem) if p is not None), None)
            if problem is not None:
                if self.resume != "auto":
                    raise ConfigError(f"trainer.resume={self.resume}: cannot load it: {problem}.")
                log.warning("resume: skipping %s, which cannot be loaded: %s", path, problem)
                failed.append(path.name)
                continue
            for group in record.pop("missing_groups", []):
                log.warning(
                    "resume: %s holds no %s tensors (saved by a run without them); %s starts "
                    "from fresh values",
                    path.name,
                    group,
                    group,
                )
            state.load_host_state(record)
            # Materialize what was loaded now, as one small graph, not inside the first step.
            self.backend.sync()
            self.backend.wait_device_ops()
            step = int(record["step"])
            if is_coordinator():
                self._set_aside_newer(step)
            barrier()
            return Restored(path, step, self._compiles_since(before))
        if failed:
            raise ConfigError(
                f"trainer.resume=auto: no checkpoint in {self.root} can be loaded "
                f"({', '.join(failed)}); move them away to start over, or point trainer.resume "
                "at a good one."
            )
        log.info("resume: no checkpoint in %s; starting from step 0", self.root)
        return None

    def _candidates(self) -> list[Path]:
        if self.resume != "auto":
            path = Path(self.resume)
            if not path.is_dir():
                raise ConfigError(f"trainer.resume={self.resume}: no such checkpoint folder.")
            return [path]
        incomplete = describe_incomplete(self.root)
        if incomplete:
            log.warning(
                "resume: skipping incomplete checkpoints in %s: %s",
                self.root,
                ", ".join(incomplete),
            )
        # Every host loads the same checkpoint: the coordinator's view of the folder.
        return broadcast_from_coordinator([p for p in step_dirs(self.root) if is_complete(p)])

    def _set_aside_newer(self, step: int) -> None:
        """Checkpoints after the resumed step (damaged ones auto skipped, or a later timeline
        when resuming an earlier checkpoint on purpose) are renamed out of the way."""
        for path in step_dirs(self.root):
            if int(path.name.removeprefix("step_")) > step:
                aside = path.with_name(f"{path.name}.after-resume-{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(aside)
                log.warning(
                    "resume: %s is newer than the resumed step %d; renamed to %s",
                    path.name,
                    step,
                    aside.name,
                )

    def _compiles_since(self, before: int | None) -> str:
        if before is None:
            return ""
        return f", {self.backend.compile_count() - before} compilations"
