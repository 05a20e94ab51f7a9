"""Asynchronous checkpoints (`trainer.checkpoint.async_save`): the step loop stages the state in
host memory and goes on training while DCP's `async_save` writes it in a background thread.

The folder format and its guarantees are those of trainers/checkpoint.py: the files go to
.step_NNNNNNNN.tmp/, and only once the write has finished are the host record and `COMPLETE`
written, the folder renamed and older checkpoints pruned (in the background thread, after the
write). A crash while a write is in flight leaves a .tmp folder that resume never takes, and the
previous checkpoint stays the newest complete one. At most one save is in flight: a new save,
the end of the run and a SIGTERM stop wait for the one before.

With several processes (the hosts of a pod, or torchrun ranks) each stages its own shards and
the background threads coordinate through a gloo process group of their own, made once at start
(`checkpoint_group`): DCP's planning and the seal run there, so they never interleave with the
collectives of the training thread on the default group. Every host's files and record are in
before the coordinator seals the folder, and every host learns the outcome, so a failed write
is reported by all of them at their next wait.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager

from torchprime.backend.base import Backend
from trainers.checkpoint import (
    WRITER_THREADS,
    _quiet_library_warnings,
    _quiet_writer_threads,
    checkpoint_dir,
    checkpoint_write_error,
    host_file,
    seal_checkpoint,
)
from trainers.hosts import barrier, is_coordinator, process_index
from trainers.storage import describe_write_failure, os_error_in

log = logging.getLogger(__name__)


class _AlreadyStaged(AsyncStager):
    """The state handed to async_save is in host memory already."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def checkpoint_group() -> dist.ProcessGroup | None:
    """A gloo group of every process for the background writes (None in a single process).
    Collective: every process must make it, in the same order as its other groups."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


class AsyncSaver:
    """One background checkpoint at a time under `root`."""

    def __init__(self, root: Path, backend: Backend, keep: int | None):
        self.root, self.backend, self.keep = root, backend, keep
        self.group = checkpoint_group()
        self.lead = is_coordinator()
        self.index = process_index(backend)
        # The write runs in another thread, outside the save's warning filters (which are
        # per process, not per thread): the same library notes, silenced for the process.
        for message in (
            "torch.distributed is disabled",
            "TypedStorage is deprecated",
            "The function definition for SavePlanner",
            "Using a non-tuple sequence for multidimensional indexing",
        ):
            warnings.filterwarnings("ignore", message=message)
        self._pending: tuple[int, Path, Future] | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def save(self, step: int, state: dict[str, Any], host_state: dict[str, Any]) -> Path:
        """Stage `state` (the live tensors) in host memory and start writing it; returns the
        folder the checkpoint will have once complete. Waits for the previous save first."""
        self.wait()
        final = checkpoint_dir(self.root, step)
        tmp = self.root / f".{final.name}.tmp"
        if self.lead and tmp.exists():
            shutil.rmtree(tmp)  # a previous save that died half-way
        barrier()  # no host writes into the folder while the coordinator still clears it
        started = time.perf_counter()
        # The step's values, not a graph still running: staging reads them (XLA: transfers
        # only, no compilation; a read while computations are in flight can fail).
        self.backend.sync()
        self.backend.wait_device_ops()
        _quiet_writer_threads()  # a failed write is reported once, by `wait`
        host = {"step": step, **host_state}  # the data position and RNG states of this step
        staged = self.backend.stage_for_checkpoint(state)
        with _quiet_library_warnings():
            # The write runs in DCP's background thread, from the staged copy (which DCP's own
            # stager would copy once more; it cannot read XLA tensors itself).
            written = dcp.async_save(
                staged,
                storage_writer=dcp.FileSystemWriter(str(tmp), thread_count=WRITER_THREADS),
                async_stager=_AlreadyStaged(),
                # XLA: the planner that writes the staged shards (one item per shard).
                planner=self.backend.checkpoint_planners()[0],
                process_group=self.group,
                no_dist=self.group is None,
            )
        staged_s = time.perf_counter() - started
        sealed: Future = Future()

        def seal(write: Future) -> None:
            # Every host reaches both collectives below whatever failed, or the others hang.
            error: BaseException | None = None
            try:
                write.result()
                host_file(tmp, self.index).write_text(json.dumps(host) + "\n")
            except BaseException as e:  # noqa: BLE001 - reported by the next wait
                error = e
            failed = [i for i, bad in enumerate(self._gather(error is not None)) if bad]
            if self.lead and not failed:
                try:
                    seal_checkpoint(tmp, final, step, state, self.keep)
                except BaseException as e:  # noqa: BLE001
                    error, failed = e, [self.index]
            failed = self._gather(failed)[0]  # the coordinator's view, on every host
            if error is None and failed:
                hosts = ", ".join(str(i) for i in failed)
                error = RuntimeError(f"the write failed on host {hosts} (its log names why)")
            if error is not None:
                if self.lead:
                    shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint is of no use
                sealed.set_exception(error)
                return
            log.info(
                "checkpoint: step %d written to %s in the background (%.2f s after staging)",
                step,
                final,
                time.perf_counter() - started - staged_s,
            )
            sealed.set_result(final)

        written.add_done_callback(seal)
        with self._lock:
            self._pending = (step, tmp, sealed)
        return final

    def _gather(self, value: Any) -> list[Any]:
        """`value` of every host in rank order, over the checkpoint group (background thread)."""
        if self.group is None:
            return [value]
        values: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(values, value, group=self.group)
        return values

    def wait(self) -> None:
        """Until the save in flight (if any) is complete; raises if it failed."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        step, tmp, sealed = pending
        started = time.perf_counter()
        try:
            sealed.result()
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is one
            if os_error_in(e) is not None:  # a full disk, an I/O error: what is left, said
                what = f"checkpoint of step {step} (written in the background)"
                raise checkpoint_write_error(describe_write_failure(what, tmp, e), self.root) from e
            # DCP's CheckpointException says only which ranks failed: name the first cause.
            failures = getattr(e, "failures", None)
            if isinstance(failures, dict) and failures:
                cause = next(iter(failures.values()))
                e = cause[0] if isinstance(cause, tuple) else cause
            lines = str(e).strip().splitlines()
            raise RuntimeError(
                f"checkpoint of step {step} failed in the background: {type(e).__name__}: "
                f"{lines[0] if lines else ''}"
            ) from e
        waited = time.perf_counter() - started
        if waited > 0.01:
            log.info("checkpoint: waited %.2f s for the write of step %d", waited, step)
