"""The training loop every trainer shares; subclasses only say what the loss is (`forward`).

One step is one graph on XLA: forward and backward over every micro-batch, gradient clipping,
the lr from the schedule (computed on the device), the optimizer update, which a non-finite
gradient turns into a no-op on the device. Metrics are read in step closures, after the step's
graph has run, so logging never adds a host-device round trip inside a step, and steps that log
trace exactly the same graph as steps that do not. Checkpoints and resuming: `restore` (before
`train`) and `save`; SIGTERM (a TPU preemption) ends the run after the current step, saved.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from optimizers.adamw import AdamW
from optimizers.groups import no_decay, param_groups  # noqa: F401 - no_decay re-exported
from optimizers.schedules import SCHEDULES, lr_multiplier, wsd_decay_steps
from torchprime.backend.base import Backend
from torchprime.recompile import RecompileError, RecompileGuard
from torchprime.errors import ConfigError
from torchprime.mesh import Mesh
from torchprime.sharding import BATCH_SPEC
from trainers.checkpoint import (
    CorruptCheckpoint,
    describe_incomplete,
    is_complete,
    load_checkpoint,
    save_checkpoint,
    step_dirs,
)
from trainers.config import DebugConfig, ProfileConfig, TrainerConfig
from trainers.data_position import TrackedBatches
from trainers.hosts import (
    any_host,
    barrier,
    broadcast_from_coordinator,
    gather_from_hosts,
    is_coordinator,
)
from trainers.metrics import MetricsFile, model_flops_per_token, peak_flops, truncate_metrics
from trainers.profiling import GraphDumper, StepProfiler

log = logging.getLogger(__name__)

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Test hook: send this process SIGTERM in the middle of that step (as a preemption would).
SIGTERM_AT_STEP_ENV = "TORCHPRIME_TEST_SIGTERM_AT_STEP"


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to try."""


@dataclass
class TrainSummary:
    """What a finished (or stopped) run reports, and train.py prints."""

    steps: int
    """The last step done (counting the steps of the runs this one resumed)."""
    max_steps: int
    start_step: int
    """The step this process started after (0, or the resumed checkpoint's)."""
    first_loss: Optional[float]
    last_loss: Optional[float]
    tokens_per_sec: float
    """Over the steps after the first one of this process (which includes compilation)."""
    elapsed_s: float
    compiles: Optional[int]
    metrics_path: Path
    checkpoint: Optional[Path]
    resumed_from: Optional[Path] = None
    stopped: Optional[str] = None
    """Why the run stopped before max_steps (SIGTERM, trainer.stop_at_step), if it did."""
    skipped_steps: int = 0
    hf_export: Optional[Path] = None


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> AdamW:
    opt = cfg.optimizer
    if opt.state_dtype is not None and opt.state_dtype not in STATE_DTYPES:
        raise ConfigError(
            f"trainer.optimizer.state_dtype={opt.state_dtype!r}: choose "
            f"{', '.join(STATE_DTYPES)} or null."
        )
    return AdamW(
        param_groups(model, opt.weight_decay, dict(opt.lr_multipliers)),
        lr=opt.lr,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
        update_clip=opt.update_clip,
        update_rms_clip=opt.update_rms_clip,
        state_dtype=STATE_DTYPES.get(opt.state_dtype) if opt.state_dtype else None,
    )


class _Preemption:
    """Notes SIGTERM instead of dying at once, so the loop can finish the step and save."""

    def __init__(self):
        self.received = False
        self._previous: Any = None

    def __enter__(self) -> "_Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True
        log.warning("SIGTERM received: finishing the current step, then saving and stopping")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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
        seq_len: Optional[int] = None,
        loggers: Sequence[Any] = (),
    ):
        sched = cfg.lr_scheduler
        if sched.name not in SCHEDULES:
            raise ConfigError(
                f"trainer.lr_scheduler.name={sched.name!r}: choose one of {', '.join(SCHEDULES)}."
            )
        if sched.name == "wsd":
            wsd_decay_steps(
                cfg.max_steps, sched.warmup_steps, sched.decay_steps, sched.decay_fraction
            )
        self.cfg = cfg
        self.model = model
        self.backend = backend
        self.mesh = mesh
        self.data = TrackedBatches(batches)
        self.output_dir = output_dir
        self.tokens_per_step = tokens_per_step
        self.loggers = list(loggers)
        self.optimizer = build_optimizer(model, cfg)
        # All optimizer state now, laid out like the parameters, and the schedule's step count
        # (on the device: the lr schedule reads it inside the graph). Materialized here, the
        # first step traces the same graph as every later one, and a checkpoint has tensors to
        # load into with the layout training gives them.
        self.optimizer.init_state(layout=backend.shard_like)
        self.step_count = torch.zeros((), dtype=torch.float32, device=backend.device)
        backend.sync()
        self.start_step = 0
        self.resumed_from: Optional[Path] = None
        self.metrics_path = output_dir / "metrics.jsonl"
        self.metrics: Optional[MetricsFile] = None
        self.flops_per_token = model_flops_per_token(model, seq_len) if seq_len else None
        self.peak_flops = peak_flops(backend.device_kind, cfg.peak_flops_per_device)
        self._losses: list[float] = []
        self._skipped = 0
        self._abort: Optional[str] = None
        self._window_start = (0, 0.0)  # (step, time) of the previous logged step
        self._steady_start: Optional[tuple[int, float]] = None
        self._bar: Optional[tqdm] = None
        # Off unless train.py configures them (the run's profile and debug blocks).
        self.profiler = StepProfiler(ProfileConfig(), backend, output_dir)
        self.graph_dumper = GraphDumper(DebugConfig(), backend, output_dir, 0)
        if cfg.compile and backend.is_xla:
            log.warning("trainer.compile=true is ignored on XLA, which compiles the whole step")
        elif cfg.compile:
            # The bound method, not the module: torch.compile on a module would prefix every
            # parameter name with `_orig_mod.` (checkpoints, HF export, optimizer groups).
            self.forward = torch.compile(self.forward)

    # -- what subclasses define ------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, aux): the scalar loss to minimize and auxiliary scalars to log. An aux
        `num_tokens` (the count the loss is a mean over) weights micro-batches when gradients
        are accumulated, so the step is that of one big batch; it is not logged."""
        raise NotImplementedError

    def export_hf(self, path: Path) -> None:
        """Write the model as a Hugging Face folder (trainer.export_hf)."""
        raise ConfigError(f"trainer.export_hf: the {self.cfg.name!r} trainer cannot export.")

    # -- one step --------------------------------------------------------------------------
    def current_lr(self) -> torch.Tensor:
        sched = self.cfg.lr_scheduler
        return self.cfg.optimizer.lr * lr_multiplier(
            self.step_count,
            sched.name,
            sched.warmup_steps,
            self.cfg.max_steps,
            sched.min_lr_ratio,
            sched.decay_steps,
            sched.decay_fraction,
        )

    def clip_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip by value (`max_grad_value`), then by global norm (`max_grad_norm`). Returns the
        norm before any clipping, and whether it is non-finite (the step must be skipped)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)
        clip_norm = norm
        if self.cfg.max_grad_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.cfg.max_grad_value)
            if self.cfg.max_grad_norm is not None:
                clip_norm = torch.nn.utils.get_total_norm(grads)
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.max_grad_norm, clip_norm)
        return norm, torch.logical_not(torch.isfinite(norm))

    def accumulate(self, micro_batches: Sequence[dict[str, torch.Tensor]]):
        """Forward and backward over the micro-batches; returns (loss, aux) of them all."""
        if len(micro_batches) == 1:
            loss, aux = self.forward(micro_batches[0])
            loss.backward()
            aux.pop("num_tokens", None)
            return loss, aux
        # Each micro-batch's loss is a mean over its own tokens: weighted by that count,
        # summed, and divided by the count of all of them, it is the big batch's loss.
        total_loss, total_count, aux_sums = None, None, {}
        for batch in micro_batches:
            loss, aux = self.forward(batch)
            count = aux.pop("num_tokens", None)
            count = torch.ones_like(loss) if count is None else count.to(loss.dtype)
            (loss * count).backward()
            weighted = loss.detach() * count
            total_loss = weighted if total_loss is None else total_loss + weighted
            total_count = count if total_count is None else total_count + count
            for k, v in aux.items():
                aux_sums[k] = aux_sums.get(k, 0) + v.detach() * count
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(total_count)
        return total_loss / total_count, {k: v / total_count for k, v in aux_sums.items()}

    def train_step(
        self, micro_batches: Sequence[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        loss, aux = self.accumulate(micro_batches)
        grad_norm, skip = self.clip_gradients()
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            mult = group.get("lr_multiplier", 1.0)
            group["lr"] = lr if mult == 1.0 else lr * mult
        self.optimizer.step(skip=skip)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        metrics = {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "lr": lr, **aux}
        if self.optimizer.update_clip_fraction is not None:
            metrics["update_clip_fraction"] = self.optimizer.update_clip_fraction
        metrics["skipped_steps"] = self.optimizer.skipped_steps
        metrics["consecutive_skips"] = self.optimizer.consecutive_skips
        return metrics

    # -- checkpoints -----------------------------------------------------------------------
    def training_state(self) -> dict[str, Any]:
        """The tensors a checkpoint holds: the model, the optimizer state keyed by parameter
        name (not position, so a checkpoint survives reordered parameter groups), and the
        device counters. The tensors themselves: loading writes into them."""
        names = {p: n for n, p in self.model.named_parameters()}
        return {
            "model": self.model.state_dict(keep_vars=True),
            "optimizer": {names[p]: dict(s) for p, s in self.optimizer.state.items()},
            "counters": {"step_count": self.step_count, **self.optimizer.counters()},
        }

    def host_state(self) -> dict[str, Any]:
        """This host's part of a checkpoint (JSON): data position and RNG states."""
        return {
            **self.data.state_dict(),
            "rng": {
                "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
                "device": self.backend.rng_state(),
            },
        }

    def save(self, step: int) -> Path:
        before = self.backend.compile_count()
        started = time.perf_counter()
        path = save_checkpoint(
            self.output_dir / "checkpoints", step, self.training_state(), self.backend,
            self.host_state(), keep=self.cfg.checkpoint.keep,
        )
        compiles = ""
        if before is not None:
            compiles = f", {self.backend.compile_count() - before} compilations"
        log.info("checkpoint: step %d saved to %s (%.2f s%s)", step, path,
                 time.perf_counter() - started, compiles)
        return path

    def restore(self) -> Optional[Path]:
        """Load the checkpoint `trainer.resume` asks for, before `train`; returns it (None:
        start from step 0). Truncates metrics.jsonl to the steps the checkpoint has seen."""
        mode = self.cfg.resume
        if mode == "never":
            return None
        root = self.output_dir / "checkpoints"
        if mode == "auto":
            incomplete = describe_incomplete(root)
            if incomplete:
                log.warning("resume: skipping incomplete checkpoints in %s: %s", root,
                            ", ".join(incomplete))
            # Every host loads the same checkpoint: the coordinator's view of the folder.
            candidates = broadcast_from_coordinator([p for p in step_dirs(root) if is_complete(p)])
        else:
            path = Path(mode)
            if not path.is_dir():
                raise ConfigError(f"trainer.resume={mode}: no such checkpoint folder.")
            candidates = [path]
        failed = []
        for path in candidates:
            before = self.backend.compile_count()
            problem = None
            try:
                record = load_checkpoint(path, self.training_state(), self.backend)
            except CorruptCheckpoint as e:
                problem = str(e)
            # One host that cannot load it is enough to skip it on all of them.
            problem = next((p for p in gather_from_hosts(problem) if p is not None), None)
            if problem is not None:
                if mode != "auto":
                    raise ConfigError(f"trainer.resume={mode}: cannot load it: {problem}.")
                log.warning("resume: skipping %s, which cannot be loaded: %s", path, problem)
                failed.append(path.name)
                continue
            self._apply_host_state(record)
            # Materialize what was loaded now, as one small graph, not inside the first step.
            self.backend.sync()
            self.backend.wait_device_ops()
            compiles = ""
            if before is not None:
                compiles = f", {self.backend.compile_count() - before} compilations"
            self.start_step = int(record["step"])
            self.resumed_from = path
            dropped = 0
            if is_coordinator():
                self._set_aside_newer_checkpoints(root)
                dropped = truncate_metrics(self.metrics_path, self.start_step)
            barrier()
            log.info("resume: continuing after step %d from %s (%d metrics records after it "
                     "dropped%s)", self.start_step, path, dropped, compiles)
            return path
        if failed:
            raise ConfigError(
                f"trainer.resume=auto: no checkpoint in {root} can be loaded ({', '.join(failed)}"
                "); move them away to start over, or point trainer.resume at a good one."
            )
        if is_coordinator():
            truncate_metrics(self.metrics_path, 0)
        barrier()
        log.info("resume: no checkpoint in %s; starting from step 0", root)
        return None

    def _set_aside_newer_checkpoints(self, root: Path) -> None:
        """Checkpoints after the resumed step (damaged ones auto skipped, or a later timeline
        when resuming an earlier checkpoint on purpose) are renamed out of the way, so neither
        the next resume nor the pruning of old checkpoints takes them for this run's."""
        for path in step_dirs(root):
            if int(path.name.removeprefix("step_")) > self.start_step:
                aside = path.with_name(f"{path.name}.after-resume-{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(aside)
                log.warning("resume: %s is newer than the resumed step %d; renamed to %s",
                            path.name, self.start_step, aside.name)

    def _apply_host_state(self, record: dict[str, Any]) -> None:
        if "batches_consumed" not in record:
            # No host record (another host count, say): the steps say how far the data went.
            record = {**record, "batches_consumed": record["step"] * self.cfg.grad_accum_steps}
        self.data.load_state_dict(record)
        rng = record.get("rng") or {}
        if rng.get("torch"):
            state = torch.frombuffer(bytearray(base64.b64decode(rng["torch"])), dtype=torch.uint8)
            torch.set_rng_state(state)
        if rng.get("device") is not None:
            self.backend.set_rng_state(rng["device"])

    # -- the loop --------------------------------------------------------------------------
    @property
    def show_bar(self) -> bool:
        """A bar on a terminal; logged lines instead in files and pod logs (no terminal)."""
        return self.cfg.progress_bar and sys.stderr.isatty()

    def should_log(self, step: int) -> bool:
        return (
            step == self.start_step + 1
            or step % self.cfg.logging_steps == 0
            or step == self.cfg.max_steps
        )

    def should_checkpoint(self, step: int) -> bool:
        ckpt = self.cfg.checkpoint
        if ckpt.interval and step % ckpt.interval == 0:
            return True
        return ckpt.save_at_end and step == self.cfg.max_steps

    def train(self) -> TrainSummary:
        self.model.train()
        # One metrics file for the run, from the coordinator (the loss is global already).
        self.metrics = MetricsFile(self.metrics_path) if is_coordinator() else None
        batches = self.backend.device_loader(self.data, self.mesh, BATCH_SPEC)
        sigterm_at = int(os.environ.get(SIGTERM_AT_STEP_ENV, "0"))
        start = time.perf_counter()
        self._window_start = (self.start_step, start)
        last_checkpoint, stopped, step = None, None, self.start_step
        self._bar = tqdm(
            total=self.cfg.max_steps, initial=self.start_step, desc="train", unit="step",
            disable=not self.show_bar,
        )
        guard = RecompileGuard(
            self.backend,
            warmup_steps=self.start_step + self.cfg.recompile_warmup_steps,
            fail=self.cfg.fail_on_recompile,
            dump_dir=self.output_dir / "recompiles",
        )
        failed = True
        try:
            with _Preemption() as preemption:
                for step in range(self.start_step + 1, self.cfg.max_steps + 1):
                    micro_batches = [next(batches) for _ in range(self.cfg.grad_accum_steps)]
                    self.data.mark_consumed(len(micro_batches))
                    self.profiler.step_begins(step)
                    metrics = self.train_step(micro_batches)
                    if step == sigterm_at:
                        os.kill(os.getpid(), signal.SIGTERM)
                    if step < self.cfg.max_steps:  # at the last step the run ends anyway
                        # All hosts stop after the same step (the save is collective), even
                        # when the signal reached some of them a step later.
                        if any_host(preemption.received):
                            stopped = "SIGTERM"
                        elif step == self.cfg.stop_at_step:
                            stopped = f"trainer.stop_at_step={step}"
                    if self.should_log(step) or stopped:
                        self.backend.add_step_closure(self._log_step, (step, metrics))
                    step_outputs = [metrics["loss"], *self.model.parameters()]
                    guard.before_sync(step, step_outputs)
                    self.graph_dumper.before_sync(step, step_outputs)
                    self.backend.sync()
                    self.profiler.step_done(step)
                    self._bar.update(1)
                    if self._abort:
                        raise TrainingError(self._abort)
                    saving = self.should_checkpoint(step) or bool(stopped)
                    if saving:
                        last_checkpoint = self.save(step)
                    try:
                        guard.after_step(step, "the checkpoint save" if saving else "")
                    except RecompileError as e:
                        raise TrainingError(str(e)) from None
                    if stopped:
                        log.warning("stopped after step %d (%s); checkpoint %s", step, stopped,
                                    last_checkpoint)
                        break
                self.backend.wait_device_ops()
            failed = False
        finally:
            self.profiler.stop()
            self._bar.close()
            if self.metrics is not None:
                self.metrics.close()
            for logger in self.loggers:
                logger.close(failed=failed)
        hf = None
        if self.cfg.export_hf and not stopped:
            hf = self.output_dir / "hf"
            # The values of the last step, not of a graph still running.
            self.backend.sync()
            self.backend.wait_device_ops()
            if self.backend.process_index == 0:
                self.export_hf(hf)
                log.info("export: HF folder written to %s", hf)
        return self._summary(step, time.perf_counter() - start, last_checkpoint, stopped, hf)

    def _log_step(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """Runs once the step's values exist (a step closure on XLA)."""
        now = time.perf_counter()
        values = {k: v.item() for k, v in metrics.items()}
        consecutive = int(values.pop("consecutive_skips"))
        prev_step, prev_time = self._window_start
        elapsed = max(now - prev_time, 1e-9)
        steps = step - prev_step
        tokens_per_sec = steps * self.tokens_per_step / elapsed
        record = {
            "step": step,
            **{k: (int(v) if k == "skipped_steps" else float(v)) for k, v in values.items()},
            "tokens_per_sec": tokens_per_sec,
            "step_time_s": elapsed / steps,
        }
        if self.flops_per_token and self.peak_flops:
            record["mfu"] = (
                tokens_per_sec * self.flops_per_token
                / (self.peak_flops * self.backend.device_count)
            )
        compiles = self.backend.compile_count()
        if compiles is not None:
            record["compiles"] = compiles
        if self.metrics is not None:
            self.metrics.write(record)
        for logger in self.loggers:
            logger.log(record)
        self._losses.append(record["loss"])
        self._skipped = record["skipped_steps"]
        self._window_start = (step, now)
        if self._steady_start is None:
            self._steady_start = (step, now)
        limit = self.cfg.max_consecutive_skips
        if limit is not None and consecutive >= limit:
            self._abort = (
                f"{consecutive} steps in a row up to step {step} had non-finite gradients and "
                f"were skipped (trainer.max_consecutive_skips={limit}); the model and optimizer "
                "are as before them. Lower trainer.optimizer.lr, check the data, or resume "
                "from an earlier checkpoint."
            )
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if not self.show_bar:
            log.info("step %d  loss %.4f  lr %.2e  %.0f tok/s", step, record["loss"],
                     record["lr"], tokens_per_sec)

    def _summary(
        self, step: int, elapsed: float, checkpoint: Optional[Path], stopped: Optional[str],
        hf: Optional[Path],
    ) -> TrainSummary:
        first_step, first_time = self._steady_start or (self.start_step, 0.0)
        last_step, last_time = self._window_start
        if last_step > first_step:
            tokens_per_sec = (last_step - first_step) * self.tokens_per_step / (last_time - first_time)
        else:
            tokens_per_sec = (step - self.start_step) * self.tokens_per_step / elapsed
        losses = [x for x in self._losses if x is not None]
        return TrainSummary(
            steps=step,
            max_steps=self.cfg.max_steps,
            start_step=self.start_step,
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
            tokens_per_sec=tokens_per_sec,
            elapsed_s=elapsed,
            compiles=self.backend.compile_count(),
            metrics_path=self.metrics_path,
            checkpoint=checkpoint,
            resumed_from=self.resumed_from,
            stopped=stopped,
            skipped_steps=self._skipped,
            hf_export=hf,
        )
