"""The run's output folder, checked before anything writes there.

Hydra creates `hydra.run.dir` (which configs/default.yaml makes `output_dir`) and opens its log
file in it before train.py's own code runs, so a folder that cannot be written ended in a Hydra
traceback. configs/default.yaml therefore names the folder through the `checked_output_dir`
resolver: resolving it is the first thing Hydra does with the folder, and a folder that is a
file, sits under a file, cannot be written or is on a read-only file system stops the command
there with one line naming `output_dir`, its value and the reason (exit status 2).
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from torchprime.errors import ConfigError
from trainers.storage import free_space

RESOLVER = "checked_output_dir"


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (what a mkdir -p would start from)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(os.sep)


def output_dir_problem(path: Path) -> str | None:
    """Why `path` cannot hold a run's outputs, or None. Writability is probed by creating and
    removing a file in the folder (or in its nearest existing ancestor when it does not exist
    yet): permission bits say nothing for root, and only a write meets a read-only mount."""
    path = Path(os.path.abspath(path))
    existing = _nearest_existing(path)
    if not existing.is_dir():
        if existing == path:
            return "it is a file, not a folder; choose another output_dir or run_name"
        return f"{existing} is a file, not a folder, so nothing can be made under it"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        where = "it" if existing == path else f"{existing} (where it would be made)"
        if e.errno == errno.EROFS:
            return f"{where} is on a read-only file system"
        if e.errno in (errno.EACCES, errno.EPERM):
            return f"{where} is not writable by this user"
        if e.errno == errno.ENOSPC:
            return f"{where} is on a full disk ({free_space(existing)} free)"
        return f"{where} cannot be written ({e.strerror})"
    return None


def check_output_dir(path: str | Path) -> None:
    """A ConfigError naming `output_dir` when the folder cannot hold the run's outputs."""
    problem = output_dir_problem(Path(path))
    if problem is not None:
        raise ConfigError(f"output_dir={path}: {problem}. Nothing was written.")


def _checked_output_dir(path: str) -> str:
    try:
        check_output_dir(path)
    except ConfigError as e:
        # Raised from a resolver, the error would reach the user wrapped in Hydra's and
        # OmegaConf's own tracebacks; this is the user's mistake, said in one line.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return path


def register_output_dir_check() -> None:
    """Make `${checked_output_dir:PATH}` available to the config (configs/default.yaml)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _checked_output_dir)
