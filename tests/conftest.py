"""Shared test helpers. XLA tests use 4 virtual CPU devices, set before torch_xla is imported."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_MODE", "offline")
# torch.compile's worker pool forks from this process, which by then runs many threads (XLA,
# autograd, writers): compile in process instead (a full run once hung in tests/unit/test_compile).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

HAS_XLA = importlib.util.find_spec("torch_xla") is not None
if HAS_XLA:
    # torch's autograd engine sizes its per-device queues at the first backward pass; a CPU
    # backward before the XLA runtime is up makes every later XLA backward in the process fail
    # an internal assert. Start it first, as train.py does (SPMD, 4 virtual devices).
    from torchprime.backend import select_backend

    select_backend("xla", cpu_devices=4)
requires_xla = pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed")


def run_train(
    *overrides: str,
    python_flags: tuple[str, ...] = (),
    timeout: int = 600,
    script: str = "train.py",
    env: dict[str, str] | None = None,
):
    """`python train.py OVERRIDES...` in a fresh process, as a user runs it (`script`: another
    entry point taking the same overrides; `env`: variables added to its environment)."""
    base = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    env = {**base, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, *python_flags, *script.split(), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def composed(*overrides: str):
    """The run config Hydra composes from configs/ with `overrides`, as train.py would."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train_config import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return OmegaConf.to_object(compose("default", overrides=list(overrides)))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# Two short default runs shared by the tests that read them (each costs a process start and,
# on XLA, compilations): one on XLA SPMD with 4 virtual devices, one on plain PyTorch.
SHORT_RUN_STEPS = 30
SHORT_RUN = (
    f"trainer.max_steps={SHORT_RUN_STEPS}",
    "trainer.logging_steps=1",
    "trainer.progress_bar=false",
)


@pytest.fixture(scope="session")
def xla_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("xla")
    # A checkpoint mid-run and the recompile guard armed: any compilation after warm-up
    # (lr warmup changing the lr, logging every step, the save) would fail the run.
    proc = run_train(
        *SHORT_RUN,
        "trainer.checkpoint.interval=10",
        "trainer.fail_on_recompile=true",
        f"output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="session")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu")
    # -X importtime lists every module the process imports, on stderr.
    proc = run_train(
        "backend=cpu",
        "ici_mesh.fsdp=1",
        *SHORT_RUN,
        f"output_dir={out}",
        python_flags=("-X", "importtime"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@contextlib.contextmanager
def mounted(target: Path, options: str, fstype: str | None = None):
    """`mount` at `target` for the block (a read-only bind of itself: `options="bind,ro"`,
    `fstype=None`; a small disk: `fstype="tmpfs", options="size=16m"`). Skips the test where
    mounting is not allowed (it needs root, or CAP_SYS_ADMIN in a container)."""
    target.mkdir(parents=True, exist_ok=True)
    args = ["mount", "-o", options, *(["-t", fstype, fstype] if fstype else [target]), target]
    if shutil.which("mount") is None or subprocess.run(args, capture_output=True).returncode:
        pytest.skip(f"cannot mount here (mount -o {options}): needs root")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", target], capture_output=True)
