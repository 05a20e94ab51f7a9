"""Checkpoints as torch.distributed.checkpoint folders, written atomically.

Layout: output_dir/checkpoints/step_00000300/ holds the DCP files and a COMPLETE marker.
It is written as .step_00000300.tmp/ and renamed once whole, so a crash mid-save never leaves
a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from torchprime.backend.base import Backend

COMPLETE = "COMPLETE"
# One writer thread makes DCP pick its overlapping loader, which fails when torchax is
# imported (it registers a device module without streams); two or more take the serial one.
WRITER_THREADS = 2


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


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a checkpoint holds: model weights and the optimizer state keyed by parameter name
    (not by position, so a checkpoint survives reordered parameter groups)."""
    names = {p: n for n, p in model.named_parameters()}
    return {
        "model": model.state_dict(),
        "optimizer": {names[p]: dict(s) for p, s in optimizer.state.items()},
    }


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, backend: Backend
) -> Path:
    final = checkpoint_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # a previous save that died half-way
    # A save launched while device computations are in flight can fail on XLA.
    backend.wait_device_ops()
    save_planner, _ = backend.checkpoint_planners()
    with _quiet_library_warnings():
        dcp.save(
            training_state(model, optimizer),
            storage_writer=dcp.FileSystemWriter(str(tmp), thread_count=WRITER_THREADS),
            planner=save_planner,
            no_dist=not dist.is_initialized(),
        )
    (tmp / COMPLETE).write_text(json.dumps({"step": step}) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, backend: Backend
) -> int:
    """Load weights and optimizer state in place; returns the checkpoint's step."""
    marker = path / COMPLETE
    if not marker.exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    step = int(json.loads(marker.read_text())["step"])
    for group in optimizer.param_groups:  # allocate state so DCP has tensors to load into
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p].update(optimizer._init_state(p))
    state = training_state(model, optimizer)
    _, load_planner = backend.checkpoint_planners()
    with _quiet_library_warnings():
        dcp.load(
            state,
            storage_reader=dcp.FileSystemReader(str(path)),
            planner=load_planner,
            no_dist=not dist.is_initialized(),
        )
    return step
