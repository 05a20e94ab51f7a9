"""Checkpoints as torch.distributed.checkpoint folders, written atomically.

Layout: output_dir/checkpoints/step_00000300/ holds
- the DCP files (`.metadata`, `*.distcp`): the model, the optimizer state keyed by parameter
  name, and the device counters (the schedule's step count, the skipped-step counts);
- `host_00000.json`, one per host: the step, the data pipeline's position as of the last batch
  the training step consumed (the logical shards that host read), and the RNG states; every
  host reads all of them on load, so a run resumes on another host count;
- `COMPLETE`, written last.
It is written as .step_00000300.tmp/ and renamed once whole, so a crash mid-save never leaves
a folder that looks complete. The newest `keep` complete checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from torchprime.backend.base import Backend
from trainers.hosts import (
    barrier,
    broadcast_from_coordinator,
    gather_from_hosts,
    is_coordinator,
    process_index,
)
from trainers.storage import WriteFailed, describe_write_failure, os_error_in

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"step_(\d{8})\Z")
# One writer thread makes DCP pick its overlapping loader, which fails when torchax is
# imported (it registers a device module without streams); two or more take the serial one.
WRITER_THREADS = 2


class CorruptCheckpoint(Exception):
    """A checkpoint folder that cannot be loaded; the message says what is wrong with it."""


@contextlib.contextmanager
def _quiet_library_warnings():
    """Silence warnings about the libraries' own internals that a user can do nothing about."""
    with warnings.catch_warnings():
        for message in (
            "torch.distributed is disabled",  # single process: intended (no_dist)
            "TypedStorage is deprecated",  # raised inside DCP's writer
            "The function definition for SavePlanner",  # torch_xla's planner signature
            "Using a non-tuple sequence for multidimensional indexing",  # torch_xla internals
        ):
            warnings.filterwarnings("ignore", message=message)
        yield


#: The function DCP's writer threads run (their names end with it).
_DCP_WRITER = "_write_files_from_queue"


def _quiet_writer_threads() -> None:
    """DCP's writer threads print their own traceback when a write fails (a full disk), maybe
    after dcp.save has raised the same error, which the save reports in one line: their
    tracebacks go to the log at debug level instead. Other threads keep the usual hook."""
    previous = threading.excepthook
    if getattr(previous, "quiets_dcp_writers", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name.endswith(f"({_DCP_WRITER})"):
            log.debug("checkpoint writer thread failed: %r", args.exc_value)
        else:
            previous(args)

    hook.quiets_dcp_writers = True
    threading.excepthook = hook


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def host_file(path: Path, process_index: int) -> Path:
    return path / f"host_{process_index:05d}.json"


def step_dirs(root: Path) -> list[Path]:
    """Every step_NNNNNNNN folder under `root`, complete or not, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def seal_checkpoint(
    tmp: Path, final: Path, step: int, state: dict[str, Any], keep: int | None
) -> None:
    """Make the written folder `tmp` the checkpoint `final` (the coordinator, once every host's
    files are in): check that every tensor was written, mark it COMPLETE, rename it, and
    delete complete checkpoints older than the newest `keep`."""
    _check_all_written(tmp, state)
    (tmp / COMPLETE).write_text(json.dumps({"step": step}) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(final.parent)
    if keep is not None:
        for old in [p for p in step_dirs(final.parent) if is_complete(p)][keep:]:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    root: Path,
    step: int,
    state: dict[str, Any],
    backend: Backend,
    host_state: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write `state` (nested dicts of tensors) and this host's JSON `host_state` as the
    checkpoint of `step`; then delete complete checkpoints older than the newest `keep`."""
    final = checkpoint_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    lead = is_coordinator()
    if lead and tmp.exists():
        shutil.rmtree(tmp)  # a previous save that died half-way
    # Every tensor must hold data, not a pending XLA graph: reading a pending tensor would
    # compile and run a graph of its own, for each tensor. The trainer saves right after a
    # step's sync, so this sync has nothing to do there; it guards other callers.
    backend.sync()
    # A save launched while device computations are in flight can fail on XLA.
    backend.wait_device_ops()
    barrier()  # no host writes into the folder while the coordinator still clears it
    save_planner, _ = backend.checkpoint_planners()
    written = None  # this host's failure to write its files, if any
    try:
        _quiet_writer_threads()
        with _quiet_library_warnings():
            dcp.save(
                state,
                storage_writer=dcp.FileSystemWriter(str(tmp), thread_count=WRITER_THREADS),
                planner=save_planner,
                no_dist=not dist.is_initialized(),
            )
        host = {"step": step, **(host_state or {})}
        host_file(tmp, process_index(backend)).write_text(json.dumps(host) + "\n")
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if os_error_in(e) is None:
            raise
        written = describe_write_failure(f"checkpoint of step {step}", tmp, e)
        # DCP raises without joining its other writer threads: let them fail too before the
        # folder is removed, so none writes into it afterwards.
        for thread in threading.enumerate():
            if thread.name.endswith(f"({_DCP_WRITER})"):
                thread.join(timeout=60)
    # Every host's files are in (or one failed) before the coordinator seals the folder.
    problem = next((p for p in gather_from_hosts(written) if p is not None), None)
    write_failed = problem is not None
    if lead and problem is None:
        try:
            seal_checkpoint(tmp, final, step, state, keep)
        except Exception as e:  # noqa: BLE001 - every host must learn of it, not hang
            write_failed = os_error_in(e) is not None
            problem = (
                describe_write_failure(f"checkpoint of step {step}", tmp, e)
                if write_failed
                else f"checkpoint of step {step} failed: {type(e).__name__}: {e}"
            )
    # The folder is final (or the save failed) for every host before any goes on.
    problem, write_failed = broadcast_from_coordinator((problem, write_failed))
    if problem is None:
        return final
    if lead and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint is of no use
    if not write_failed:
        raise RuntimeError(problem)
    raise checkpoint_write_error(problem, root)


def checkpoint_write_error(problem: str, root: Path) -> WriteFailed:
    """The error of a checkpoint write that failed (a full disk, an I/O error) after its
    partial folder was removed: what is left to resume from."""
    earlier = [p.name for p in step_dirs(root) if is_complete(p)]
    return WriteFailed(
        f"{problem}. The partial folder was removed; "
        + (
            f"the earlier checkpoints ({', '.join(earlier)}) and metrics.jsonl are intact: "
            "make room, then run the same command with trainer.resume=auto to continue."
            if earlier
            else "no earlier checkpoint exists; metrics.jsonl is intact. Make room and start again."
        )
    )


def _flat_keys(state: dict[str, Any], prefix: str = "") -> list[str]:
    """The names DCP gives the tensors of nested dicts (parts joined by dots)."""
    keys = []
    for k, v in state.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return keys


def _check_all_written(path: Path, state: dict[str, Any]) -> None:
    """Every tensor of `state` is in the checkpoint's metadata. A planner that drops one
    would otherwise leave a checkpoint that only fails at the resume, maybe days later."""
    written = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in _flat_keys(state) if k not in written]
    if missing:
        raise RuntimeError(
            f"checkpoint {path}: {len(missing)} tensors were not written ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); the folder is left incomplete."
        )


def check_readable(path: Path) -> dict[str, Any]:
    """The COMPLETE marker of `path`, after checking that the DCP metadata reads and that every
    data file it names is there and long enough; raises CorruptCheckpoint otherwise."""
    marker = path / COMPLETE
    if not marker.is_file():
        raise CorruptCheckpoint(f"no {COMPLETE} marker (the save did not finish)")
    try:
        complete = json.loads(marker.read_text())
        int(complete["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"unreadable {COMPLETE} marker ({e})") from e
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - pickle raises anything on a damaged file
        raise CorruptCheckpoint(f"unreadable DCP metadata ({type(e).__name__}: {e})") from e
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < end:
            what = "missing" if size is None else f"{size} bytes, {end} expected"
            raise CorruptCheckpoint(f"data file {name} is {what}")
    return complete


#: Top-level groups of a checkpoint's tensors that only some runs write (trainer.spike's
#: statistics): a checkpoint without one still loads, that group keeping its fresh values.
OPTIONAL_GROUPS = ("spike",)


def load_checkpoint(path: Path, state: dict[str, Any], backend: Backend) -> dict[str, Any]:
    """Load the tensors of `state` in place from `path`; returns this host's JSON record
    (at least {"step": N}; no more when the checkpoint had fewer hosts), with "hosts": every
    host's record, in host order (the data positions of all logical shards), and
    "missing_groups": the OPTIONAL_GROUPS of `state` the checkpoint lacks, left as they were.
    Raises CorruptCheckpoint when the folder cannot be loaded (the tensors may then be partly
    overwritten: load another checkpoint or stop)."""
    complete = check_readable(path)
    saved = {
        key.split(".")[0]
        for key in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    }
    missing = [g for g in OPTIONAL_GROUPS if g in state and g not in saved]
    state = {k: v for k, v in state.items() if k not in missing}
    _, load_planner = backend.checkpoint_planners()
    try:
        # In place into parameters: autograd must not record the copies.
        with torch.no_grad(), _quiet_library_warnings():
            dcp.load(
                state,
                storage_reader=dcp.FileSystemReader(str(path)),
                planner=load_planner,
                no_dist=not dist.is_initialized(),
            )
    # DCP wraps reader errors in its own types; its CheckpointException is a BaseException.
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        raise CorruptCheckpoint(f"loading failed ({type(e).__name__}: {_first_line(e)})") from e
    record: dict[str, Any] = {"step": int(complete["step"])}
    if missing:
        record["missing_groups"] = missing
    hosts = []
    for file in sorted(path.glob("host_*.json")):
        try:
            hosts.append(json.loads(file.read_text()))
        except ValueError as e:
            raise CorruptCheckpoint(f"unreadable {file.name} ({e})") from e
        if file == host_file(path, process_index(backend)):
            record.update(hosts[-1])
    record["hosts"] = hosts
    return record


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""


def describe_incomplete(root: Path) -> list[str]:
    """Folders under `root` that look like checkpoints but are not complete (for warnings)."""
    found = [p.name for p in step_dirs(root) if not is_complete(p)]
    if root.is_dir():
        found += sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp"))
    return found


def fsync_dir(path: Path) -> None:
    """Make a rename durable where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
