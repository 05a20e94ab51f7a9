"""Trainers by name (`trainer.name`): the base trainer runs the loop, subclasses define the loss.
`make_trainer` gives one its standard parts (checkpoint manager, metrics logger)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from torchprime.backend.base import Backend
from torchprime.errors import ConfigError
from torchprime.mesh import Mesh
from trainers.base_trainer import BaseTrainer
from trainers.callbacks import StepCallback
from trainers.checkpoint_manager import CheckpointManager
from trainers.config import TrainerConfig
from trainers.evaluator import Evaluator
from trainers.lm_trainer import LMTrainer
from trainers.metrics_logger import MetricsLogger, Sink

TRAINERS: dict[str, type[BaseTrainer]] = {"lm": LMTrainer}


def get_trainer_class(name: str) -> type[BaseTrainer]:
    if name not in TRAINERS:
        raise ConfigError(f"trainer.name={name!r}: known trainers are {', '.join(TRAINERS)}.")
    return TRAINERS[name]


def make_trainer(
    cfg: TrainerConfig,
    model: nn.Module,
    backend: Backend,
    mesh: Mesh,
    batches: Iterable[dict[str, torch.Tensor]],
    output_dir: Path,
    *,
    tokens_per_step: int,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    sinks: Sequence[Sink] = (),
    callbacks: Sequence[StepCallback] = (),
    optimizer_state_dtype: torch.dtype | None = None,
    evaluator: Evaluator | None = None,
) -> BaseTrainer:
    """The `cfg.name` trainer of `model`, checkpointing under output_dir/checkpoints and
    logging to output_dir/metrics.jsonl (and `sinks`)."""
    metrics = MetricsLogger(
        output_dir / "metrics.jsonl",
        backend,
        tokens_per_step,
        flops_per_token,
        peak_flops,
        progress_bar=cfg.progress_bar,
        sinks=sinks,
    )
    checkpoints = CheckpointManager(cfg.checkpoint, cfg.resume, output_dir / "checkpoints", backend)
    return get_trainer_class(cfg.name)(
        cfg,
        model,
        backend,
        mesh,
        batches,
        output_dir,
        checkpoints,
        metrics,
        callbacks,
        evaluator,
        optimizer_state_dtype=optimizer_state_dtype,
    )
