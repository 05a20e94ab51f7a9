"""A copy of everything written to the process's standard error, C++ included.

XLA's partitioner reports what it could not shard well (an involuntary full rematerialization)
as C++ log lines on file descriptor 2, which Python cannot intercept above it. The tee swaps
descriptor 2 for a pipe; a thread writes each line to a file and passes it on to the real
standard error, except XLA's own log lines, which only go to the file (they are many, and the
dry run reports the ones that matter).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: TSL's log line prefix: "2026-12-02 14:50:00.123456: W external/xla/..." (or glog's "W1202 ...").
_XLA_LOG_LINE = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |[IWEF]\d{4} \d\d:)")


@contextmanager
def stderr_tee(path: Path) -> Iterator[None]:
    """Within the block, standard error goes to `path` and, but for XLA's log lines, on to
    the terminal as before."""
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with open(path, "ab") as copy, os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                copy.write(line)
                if not _XLA_LOG_LINE.match(line):
                    os.write(original, line)
            copy.flush()

    thread = threading.Thread(target=pump, name="stderr-tee", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the pump reads to its end
        thread.join(timeout=10)
        os.close(original)
