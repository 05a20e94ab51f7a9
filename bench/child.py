"""A benchmark variant measured in a process of its own (`python -m bench.X --child VARIANT`):
a fresh process starts from an empty heap and its own runtime, so peak memory and speed of one
variant do not carry into the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: For peak-RSS measurements: malloc hands large blocks back to the system at once, so the
#: resident size follows the live tensors.
RSS_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(module: str, variant: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """`python -m bench.MODULE --child VARIANT ARGS...` from the repository root; the JSON of
    the last line it prints. Raises with the end of its stderr when it fails."""
    command = [sys.executable, "-m", f"bench.{module}", "--child", variant, *args]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{module} {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
