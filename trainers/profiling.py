"""Traces of chosen training steps and dumps of the step's graph (the `profile` and `debug`
config blocks)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from torchprime.backend.base import Backend
from trainers.callbacks import Callback
from trainers.config import DebugConfig, ProfileConfig

log = logging.getLogger(__name__)


class StepProfiler(Callback):
    """Starts a trace before step `start_step` and stops it after `num_steps` steps (or when
    the run ends first)."""

    def __init__(self, cfg: ProfileConfig, backend: Backend, output_dir: Path):
        self.cfg = cfg
        self.backend = backend
        self.dir = Path(cfg.dir) if cfg.dir else output_dir / "profile"
        self.active = False

    def step_begins(self, step: int) -> None:
        if self.cfg.start_step is not None and step == self.cfg.start_step and not self.active:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.backend.start_trace(self.dir)
            self.active = True
            log.info("profile: tracing steps %d to %d", step, step + self.cfg.num_steps - 1)

    def step_done(self, step: int) -> None:
        if self.active and step >= self.cfg.start_step + self.cfg.num_steps - 1:
            self.close()

    def close(self) -> None:
        if self.active:
            self.backend.wait_device_ops()  # the traced steps' device work belongs in the trace
            self.backend.stop_trace(self.dir)
            self.active = False
            log.info("profile: trace written to %s", self.dir)


class GraphDumper(Callback):
    """Writes the step's traced graph for the steps that compile: the first `steps` of this
    process."""

    def __init__(self, cfg: DebugConfig, backend: Backend, output_dir: Path, steps: int = 2):
        self.enabled = cfg.dump_hlo and backend.is_xla
        self.backend = backend
        self.dir = hlo_dir(output_dir)
        self.left = steps

    def before_sync(self, step: int, tensors: list[torch.Tensor]) -> Path | None:
        if not self.enabled or self.left <= 0:
            return None
        self.left -= 1
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:08d}.hlo.txt"
        path.write_text(self.backend.graph_text(tensors))
        return path


def hlo_dir(output_dir: Path) -> Path:
    return output_dir / "hlo"


def prune_compiler_dumps(directory: Path) -> None:
    """Keep the HLO text of XLA's dump. XLA:CPU writes its LLVM IR, MLIR and object files
    there too (hundreds of files, tens of MB even for a tiny model), which are not the program
    a TPU runs."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.is_file() and path.suffix != ".txt":
            path.unlink()
