"""Writes that fail for want of disk: a full disk, a file-size limit, an I/O error. The run
stops with one message naming the path, the error and the space left, instead of the
traceback of whichever library was writing (DCP wraps its writer's errors in its own)."""

from __future__ import annotations

import os
from pathlib import Path


def free_space(path: Path) -> str:
    """The space left on `path`'s file system, for messages ("12.3 MiB", "unknown")."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB"
    return "unknown"


class WriteFailed(RuntimeError):
    """A write into output_dir failed; the message names the path and the free space."""


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, its cause or context, or (DCP's CheckpointException)
    one of the ranks' failures."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        failures = getattr(err, "failures", None)  # DCP: {rank: (exception, its stack)}
        if isinstance(failures, dict):
            for failure in failures.values():
                failure = failure[0] if isinstance(failure, tuple) and failure else failure
                if isinstance(failure, BaseException):
                    todo.append(failure)
        todo += [err.__cause__, err.__context__]
    return None


def describe_write_failure(what: str, path: Path, e: BaseException) -> str:
    """ "writing PATH failed: No space left on device (FILE; 0.0 MiB free there)"."""
    os_error = os_error_in(e)
    if os_error is not None:
        reason = os_error.strerror or str(os_error)
        if os_error.filename:
            reason += f" ({os_error.filename})"
    else:
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return f"{what}: writing {path} failed: {reason}; {free_space(path)} free there"
