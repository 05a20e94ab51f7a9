"""The training loop every trainer shares; subclasses only say what the loss is (`forward`).

One step is one graph on XLA: forward, backward, gradient clipping, the lr from the schedule
(computed on the device), the optimizer update. Metrics are read in step closures, after the
step's graph has run, so logging never adds a host-device round trip inside a step, and steps
that log trace exactly the same graph as steps that do not.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from optimizers.adamw import AdamW
from optimizers.schedules import SCHEDULES, lr_multiplier
from torchprime.backend.base import Backend
from torchprime.errors import ConfigError
from torchprime.mesh import Mesh
from torchprime.sharding import BATCH_SPEC
from trainers.checkpoint import save_checkpoint
from trainers.config import TrainerConfig
from trainers.metrics import MetricsFile

log = logging.getLogger(__name__)

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainSummary:
    """What a finished run reports (and train.py prints)."""

    steps: int
    first_loss: float
    last_loss: float
    tokens_per_sec: float
    """Over the steps after the first one (which includes compilation on XLA)."""
    elapsed_s: float
    compiles: Optional[int]
    metrics_path: Path
    checkpoint: Optional[Path]


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases and embeddings are not decayed (vectors and lookup tables)."""
    return param.dim() < 2 or "embed" in name


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> AdamW:
    opt = cfg.optimizer
    if opt.state_dtype is not None and opt.state_dtype not in STATE_DTYPES:
        raise ConfigError(
            f"trainer.optimizer.state_dtype={opt.state_dtype!r}: choose "
            f"{', '.join(STATE_DTYPES)} or null."
        )
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": opt.weight_decay},
        {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
    ]
    return AdamW(
        [g for g in groups if g["params"]],
        lr=opt.lr,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
        update_clip=opt.update_clip,
        update_rms_clip=opt.update_rms_clip,
        state_dtype=STATE_DTYPES.get(opt.state_dtype) if opt.state_dtype else None,
    )


class BaseTrainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        model: nn.Module,
        backend: Backend,
        mesh: Mesh,
        batches: Iterable[dict[str, torch.Tensor]],
        output_dir: Path,
        tokens_per_step: int,
    ):
        if cfg.lr_scheduler.name not in SCHEDULES:
            raise ConfigError(
                f"trainer.lr_scheduler.name={cfg.lr_scheduler.name!r}: choose one of "
                f"{', '.join(SCHEDULES)}."
            )
        self.cfg = cfg
        self.model = model
        self.backend = backend
        self.mesh = mesh
        self.batches = batches
        self.output_dir = output_dir
        self.tokens_per_step = tokens_per_step
        self.optimizer = build_optimizer(model, cfg)
        # Steps done, on the device: the lr schedule reads it inside the graph.
        self.step_count = torch.zeros((), dtype=torch.float32, device=backend.device)
        self.metrics = MetricsFile(output_dir / "metrics.jsonl")
        self._losses: list[float] = []
        self._window_start = (0, 0.0)  # (step, time) of the previous logged step
        self._steady_start: Optional[tuple[int, float]] = None
        self._bar: Optional[tqdm] = None

    # -- what subclasses define ------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss to minimize and auxiliary scalars to log."""
        raise NotImplementedError

    # -- one step --------------------------------------------------------------------------
    def current_lr(self) -> torch.Tensor:
        sched = self.cfg.lr_scheduler
        return self.cfg.optimizer.lr * lr_multiplier(
            self.step_count,
            sched.name,
            sched.warmup_steps,
            self.cfg.max_steps,
            sched.min_lr_ratio,
        )

    def clip_gradients(self) -> torch.Tensor:
        """Clip by global norm when `max_grad_norm` is set; returns the norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.max_grad_norm is None:
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        return torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss, aux = self.forward(batch)
        loss.backward()
        grad_norm = self.clip_gradients()
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "lr": lr, **aux}

    # -- the loop --------------------------------------------------------------------------
    @property
    def show_bar(self) -> bool:
        """A bar on a terminal; logged lines instead in files and pod logs (no terminal)."""
        return self.cfg.progress_bar and sys.stderr.isatty()

    def should_log(self, step: int) -> bool:
        return step == 1 or step % self.cfg.logging_steps == 0 or step == self.cfg.max_steps

    def should_checkpoint(self, step: int) -> bool:
        ckpt = self.cfg.checkpoint
        if ckpt.interval and step % ckpt.interval == 0:
            return True
        return ckpt.save_at_end and step == self.cfg.max_steps

    def train(self) -> TrainSummary:
        self.model.train()
        batches = self.backend.device_loader(self.batches, self.mesh, BATCH_SPEC)
        start = time.perf_counter()
        self._window_start = (0, start)
        last_checkpoint = None
        self._bar = tqdm(
            total=self.cfg.max_steps, desc="train", unit="step", disable=not self.show_bar
        )
        try:
            for step in range(1, self.cfg.max_steps + 1):
                metrics = self.train_step(next(batches))
                if self.should_log(step):
                    self.backend.add_step_closure(self._log_step, (step, metrics))
                self.backend.sync()
                self._bar.update(1)
                if self.should_checkpoint(step):
                    last_checkpoint = save_checkpoint(
                        self.output_dir / "checkpoints", step, self.model, self.optimizer,
                        self.backend,
                    )
                    log.info("checkpoint: step %d saved to %s", step, last_checkpoint)
            self.backend.wait_device_ops()
        finally:
            self._bar.close()
            self.metrics.close()
        return self._summary(time.perf_counter() - start, last_checkpoint)

    def _log_step(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """Runs once the step's values exist (a step closure on XLA)."""
        now = time.perf_counter()
        values = {k: float(v.item()) for k, v in metrics.items()}
        prev_step, prev_time = self._window_start
        elapsed = max(now - prev_time, 1e-9)
        steps = step - prev_step
        record = {
            "step": step,
            **values,
            "tokens_per_sec": steps * self.tokens_per_step / elapsed,
            "step_time_s": elapsed / steps,
        }
        compiles = self.backend.compile_count()
        if compiles is not None:
            record["compiles"] = compiles
        self.metrics.write(record)
        self._losses.append(values["loss"])
        self._window_start = (step, now)
        if self._steady_start is None:
            self._steady_start = (step, now)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        if not self.show_bar:
            log.info("step %d  loss %.4f  lr %.2e  %.0f tok/s", step, values["loss"],
                     values["lr"], record["tokens_per_sec"])

    def _summary(self, elapsed: float, checkpoint: Optional[Path]) -> TrainSummary:
        steps = self.cfg.max_steps
        first_step, first_time = self._steady_start or (0, 0.0)
        last_step, last_time = self._window_start
        if last_step > first_step:
            tokens_per_sec = (last_step - first_step) * self.tokens_per_step / (last_time - first_time)
        else:
            tokens_per_sec = steps * self.tokens_per_step / elapsed
        return TrainSummary(
            steps=steps,
            first_loss=self._losses[0],
            last_loss=self._losses[-1],
            tokens_per_sec=tokens_per_sec,
            elapsed_s=elapsed,
            compiles=self.backend.compile_count(),
            metrics_path=self.metrics.path,
            checkpoint=checkpoint,
        )
