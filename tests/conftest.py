"""Shared test helpers. XLA tests use 4 virtual CPU devices, set before torch_xla is imported."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_MODE", "offline")

HAS_XLA = importlib.util.find_spec("torch_xla") is not None
if HAS_XLA:
    # torch's autograd engine sizes its per-device queues at the first backward pass; a CPU
    # backward before the XLA runtime is up makes every later XLA backward in the process fail
    # an internal assert. Start it first, as train.py does (SPMD, 4 virtual devices).
    from torchprime.backend import select_backend

    select_backend("xla", cpu_devices=4)
requires_xla = pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed")


def run_train(*overrides: str, python_flags: tuple[str, ...] = (), timeout: int = 600):
    """`python train.py OVERRIDES...` in a fresh process, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    env["WANDB_MODE"] = "offline"
    return subprocess.run(
        [sys.executable, *python_flags, "train.py", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
