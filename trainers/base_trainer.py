"""The training loop every trainer shares; subclasses only say what the loss is (`forward`).

One step is one graph on XLA: forward and backward over every micro-batch, gradient clipping,
the lr from the schedule (computed on the device), the optimizer update, which a non-finite
gradient turns into a no-op on the device. Metrics are read in step closures, after the step's
graph has run, so logging never adds a host-device round trip inside a step, and steps that log
trace exactly the same graph as steps that do not.

The trainer is given what it works with: the model, the backend and mesh, this host's batches,
a checkpoint manager (saving, resuming) and a metrics logger (metrics.jsonl, wandb, progress,
the summary), and callbacks that watch each step (profiler, graph dumps). It is itself what a
checkpoint holds (`checkpoint_tensors`, `host_state`).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optimizers.adamw import AdamW
from optimizers.groups import param_groups
from optimizers.schedules import lr_multiplier
from torchprime.backend.base import Backend
from torchprime.errors import ConfigError
from torchprime.mesh import Mesh
from torchprime.recompile import RecompileError, RecompileGuard
from torchprime.sharding import BATCH_SPEC
from torchprime.stacking import per_layer_state, restack_state, stacked_modules
from trainers.callbacks import StepCallback
from trainers.checkpoint_manager import CheckpointManager
from trainers.config import TrainerConfig
from trainers.data_position import TrackedBatches
from trainers.evaluator import EvalResult, Evaluator
from trainers.hosts import barrier, is_coordinator
from trainers.metrics_logger import MetricsLogger, TrainSummary
from trainers.preemption import Preemption
from trainers.spike import SpikeDetector

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to try."""


def build_optimizer(
    model: nn.Module, cfg: TrainerConfig, backend: Backend, state_dtype: torch.dtype | None = None
) -> AdamW:
    """AdamW over the model's parameter groups; moments in `state_dtype` (precision.
    optimizer_state; None: each parameter's dtype)."""
    opt = cfg.optimizer
    return AdamW(
        param_groups(model, opt.weight_decay, dict(opt.lr_multipliers)),
        lr=opt.lr,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
        update_clip=opt.update_clip,
        update_rms_clip=opt.update_rms_clip,
        state_dtype=state_dtype,
        traced=backend.is_xla,
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
        checkpoints: CheckpointManager,
        metrics: MetricsLogger,
        callbacks: Sequence[StepCallback] = (),
        evaluator: Evaluator | None = None,
        optimizer_state_dtype: torch.dtype | None = None,
    ):
        self.cfg = cfg
        self.evaluator = evaluator
        """Held-out evaluation (None: the run has no held-out data)."""
        self.output_dir = output_dir
        self.model = model
        self.backend = backend
        self.mesh = mesh
        self.data = TrackedBatches(batches)
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.callbacks = list(callbacks)
        self.optimizer = build_optimizer(model, cfg, backend, optimizer_state_dtype)
        # All optimizer state now, laid out like the parameters, and the schedule's step count
        # (on the device: the lr schedule reads it inside the graph). Materialized here, the
        # first step traces the same graph as every later one, and a checkpoint has tensors to
        # load into with the layout training gives them.
        self.optimizer.init_state(layout=backend.shard_like)
        self.step_count = torch.zeros((), dtype=torch.float32, device=backend.device)
        self.spike = SpikeDetector(cfg.spike, backend.device) if cfg.spike.enabled else None
        backend.sync()
        if backend.is_xla and stacked_modules(model):
            # A checkpoint copies stacked weights out per layer: that graph compiles now, not
            # at the first save after warm-up (a recompilation to trainer.fail_on_recompile).
            self.checkpoint_tensors()
        self.start_step = 0
        self.resumed_from: Path | None = None
        self._abort: str | None = None
        if cfg.compile and backend.is_xla:
            log.warning("trainer.compile=true is ignored on XLA, which compiles the whole step")
        elif cfg.compile:
            # The bound method, not the module: torch.compile on a module would prefix every
            # parameter name with `_orig_mod.` (checkpoints, HF export, optimizer groups).
            self.forward = torch.compile(self.forward)

    # -- what subclasses define ------------------------------------------------------------
    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, aux): the scalar loss to minimize and auxiliary scalars to log. An aux
        `num_tokens` (the count the loss is a mean over) weights micro-batches when gradients
        are accumulated, so the step is that of one big batch; it is not logged."""
        raise NotImplementedError

    def export_hf(self, path: Path) -> None:
        """Write the model as a Hugging Face folder (trainer.export_hf). Every process calls
        it; the coordinator writes."""
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
        norm = self.backend.total_norm(grads)
        clip_norm = norm
        if self.cfg.max_grad_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.cfg.max_grad_value)
            if self.cfg.max_grad_norm is not None:
                clip_norm = self.backend.total_norm(grads)
        if self.cfg.max_grad_norm is not None:
            self.backend.clip_grads_with_norm_(params, self.cfg.max_grad_norm, clip_norm)
        return norm, torch.logical_not(torch.isfinite(norm))

    def accumulate(self, micro_batches: Sequence[dict[str, torch.Tensor]]):
        """Forward and backward over the micro-batches; returns (loss, aux) of them all."""
        if len(micro_batches) == 1 and not self.backend.local_batch:
            loss, aux = self.forward(micro_batches[0])
            loss.backward()
            aux.pop("num_tokens", None)
            return loss, aux
        # Each micro-batch's loss is a mean over its own tokens: weighted by that count,
        # summed, and divided by the count of all of them, it is the big batch's loss. Where
        # each process holds its own rows (`local_batch`), the sums run over processes too, and
        # gradients are reduced across them only with the last micro-batch.
        total_loss, total_count, aux_sums = None, None, {}
        for i, batch in enumerate(micro_batches):
            self.backend.set_gradient_sync(self.model, i == len(micro_batches) - 1)
            loss, aux = self.forward(batch)
            count = aux.pop("num_tokens", None)
            count = torch.ones_like(loss) if count is None else count.to(loss.dtype)
            (loss * count).backward()
            weighted = loss.detach() * count
            total_loss = weighted if total_loss is None else total_loss + weighted
            total_count = count if total_count is None else total_count + count
            for k, v in aux.items():
                aux_sums[k] = aux_sums.get(k, 0) + v.detach() * count
        total_loss, total_count = map(self.backend.sum_over_data, (total_loss, total_count))
        aux_sums = {k: self.backend.sum_over_data(v) for k, v in aux_sums.items()}
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(total_count)
        return total_loss / total_count, {k: v / total_count for k, v in aux_sums.items()}

    def train_step(
        self, micro_batches: Sequence[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        loss, aux = self.accumulate(micro_batches)
        grad_norm, skip = self.clip_gradients()
        if self.spike is not None:  # decided on the device, like the non-finite skip
            skip = skip | self.spike.check(loss, grad_norm, skip)
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
        if self.spike is not None:
            metrics.update(self.spike.metrics())
        return metrics

    # -- what a checkpoint holds -------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, Any]:
        """The tensors a checkpoint holds: the model, the optimizer state keyed by parameter
        name (not position, so a checkpoint survives reordered parameter groups), and the
        device counters. The tensors themselves: loading writes into them."""
        # Weights stored stacked (model.remat.stack_weights) are written one tensor per layer
        # under the per-layer names, so a checkpoint loads with or without stacking. On XLA
        # the layers are copies, laid out like one layer's weight: a load writes into them,
        # and `tensors_loaded` stacks them back.
        copy = self.backend.is_xla
        live = self._live_tensors()
        tensors = {
            "model": per_layer_state(self.model, live["model"], copy),
            "optimizer": per_layer_state(self.model, live["optimizer"], copy),
            "counters": {"step_count": self.step_count, **self.optimizer.counters()},
        }
        if copy and stacked_modules(self.model):
            self.backend.sync()  # the per-layer copies hold data before a save reads them
        if self.spike is not None:  # the running statistics: a resume decides the same way
            tensors["spike"] = self.spike.state()
        return tensors

    def tensors_loaded(self, tensors: dict[str, Any]) -> None:
        """After a load into `checkpoint_tensors()`'s tensors (or some of its parts): weights
        stored stacked get their per-layer values back."""
        if stacked_modules(self.model):
            live = self._live_tensors()
            for part in ("model", "optimizer"):
                if part in tensors:
                    restack_state(self.model, live[part], tensors[part])

    def _live_tensors(self) -> dict[str, Any]:
        """The model's state dict and the optimizer state keyed by parameter name."""
        names = {p: n for n, p in self.model.named_parameters()}
        return {
            "model": self.model.state_dict(keep_vars=True),
            "optimizer": {names[p]: dict(s) for p, s in self.optimizer.state.items()},
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

    def load_host_state(self, record: dict[str, Any]) -> None:
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

    def restore(self) -> Path | None:
        """Load the checkpoint `trainer.resume` asks for, before `train`; returns it (None:
        start from step 0). metrics.jsonl keeps only the steps the checkpoint has seen."""
        restored = self.checkpoints.restore(self)
        if self.checkpoints.resume == "never":
            return None
        step = restored.step if restored else 0
        dropped = self.metrics.truncate(step)
        barrier()
        if restored is None:
            return None
        self.start_step, self.resumed_from = step, restored.path
        log.info(
            "resume: continuing after step %d from %s (%d metrics records after it dropped%s)",
            step,
            restored.path,
            dropped,
            restored.compiles,
        )
        return restored.path

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> TrainSummary:
        """Steps from the one after `start_step` to trainer.max_steps (or until stopped)."""
        self.model.train()
        batches = self.backend.device_loader(self.data, self.mesh, BATCH_SPEC)
        guard = RecompileGuard(
            self.backend,
            warmup_steps=self.start_step + self.cfg.recompile_warmup_steps,
            fail=self.cfg.fail_on_recompile,
            dump_dir=self.output_dir / "recompiles",
        )
        started = time.perf_counter()
        self.metrics.start(self.start_step, self.cfg.max_steps)
        last_checkpoint, stopped, step, failed = None, None, self.start_step, True
        try:
            with Preemption() as preemption:
                for step in range(self.start_step + 1, self.cfg.max_steps + 1):
                    metrics = self._run_step(step, batches)
                    stopped = self._stop_reason(step, preemption)
                    evaluating = self._should_evaluate(step)
                    if stopped or evaluating or self._should_log(step):
                        self.backend.add_step_closure(self._on_metrics, (step, metrics, evaluating))
                    self._launch(step, [metrics["loss"], *self.model.parameters()], guard)
                    saving = self.checkpoints.should_save(step, self.cfg.max_steps) or bool(stopped)
                    if saving:
                        last_checkpoint = self.checkpoints.save(step, self)
                    try:
                        guard.after_step(step, "the checkpoint save" if saving else "")
                        if evaluating:
                            self.evaluate(step)
                            guard.after_graph(step, "the evaluation")
                    except RecompileError as e:
                        raise TrainingError(str(e)) from None
                    if stopped:
                        log.warning(
                            "stopped after step %d (%s); checkpoint %s",
                            step,
                            stopped,
                            last_checkpoint,
                        )
                        break
                self.backend.wait_device_ops()
                # The end of the run and a stop wait for a checkpoint written in the background.
                self.checkpoints.wait()
            failed = False
        finally:
            for callback in self.callbacks:
                callback.close()
            self.metrics.close(failed=failed)
        hf = self._export_at_end() if self.cfg.export_hf and not stopped else None
        return self.metrics.summary(
            steps=step,
            max_steps=self.cfg.max_steps,
            start_step=self.start_step,
            tokens_per_sec=self.metrics.steady_tokens_per_sec(
                self.start_step, step, time.perf_counter() - started
            ),
            elapsed_s=time.perf_counter() - started,
            checkpoint=last_checkpoint,
            resumed_from=self.resumed_from,
            stopped=stopped,
            hf_export=hf,
            **self._eval_summary(),
        )

    def _should_evaluate(self, step: int) -> bool:
        return self.evaluator is not None and self.evaluator.due(step, self.cfg.max_steps)

    def evaluate(self, step: int) -> EvalResult:
        """The held-out loss after `step`, logged with that step's record."""
        assert self.evaluator is not None
        started = time.perf_counter()
        result = self.evaluator.evaluate(self.model, self.forward, step)
        self.metrics.log_eval(step, result.record(), time.perf_counter() - started)
        return result

    def _eval_summary(self) -> dict[str, Any]:
        if self.evaluator is None or self.evaluator.last is None:
            return {}
        best, last = self.evaluator.best, self.evaluator.last
        return {"eval_best": (best.step, best.loss), "eval_last": (last.step, last.loss)}

    def _run_step(
        self, step: int, batches: Iterator[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Take the step's micro-batches and trace (XLA) or run (eager) the step."""
        for callback in self.callbacks:
            callback.step_begins(step)
        micro_batches = [next(batches) for _ in range(self.cfg.grad_accum_steps)]
        self.data.mark_consumed(len(micro_batches))
        return self.train_step(micro_batches)

    def _launch(self, step: int, outputs: list[torch.Tensor], guard: RecompileGuard) -> None:
        """Run the traced step (XLA: cut the graph and launch it), with the watchers around."""
        guard.before_sync(step, outputs)
        for callback in self.callbacks:
            callback.before_sync(step, outputs)
        self.backend.sync()
        for callback in self.callbacks:
            callback.step_done(step)
        self.metrics.step_done()
        if self._abort:
            raise TrainingError(self._abort)

    def _stop_reason(self, step: int, preemption: Preemption) -> str | None:
        if step == self.cfg.max_steps:  # the run ends here anyway
            return None
        if preemption.requested():
            return "SIGTERM"
        if step == self.cfg.stop_at_step:
            return f"trainer.stop_at_step={step}"
        return None

    def _should_log(self, step: int) -> bool:
        return (
            step == self.start_step + 1
            or step % self.cfg.logging_steps == 0
            or step == self.cfg.max_steps
        )

    def _on_metrics(
        self, step: int, metrics: dict[str, torch.Tensor], evaluating: bool = False
    ) -> None:
        """Runs once the step's values exist (a step closure on XLA). An evaluated step's
        record waits for the evaluation's values."""
        values = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        consecutive = int(values.pop("consecutive_skips"))
        # Rows the data pipeline left out (data.on_bad_row=skip), read ahead ones included.
        if skipped_rows := getattr(self.data.batches, "skipped_rows", 0):
            values["skipped_rows"] = skipped_rows
        self.metrics.log(step, values, hold=evaluating)
        limit = self.cfg.max_consecutive_skips
        if limit is not None and consecutive >= limit:
            self._abort = (
                f"{consecutive} steps in a row up to step {step} had non-finite gradients "
                "(or loss / grad-norm spikes, trainer.spike) and were skipped "
                f"(trainer.max_consecutive_skips={limit}); the model and optimizer are as "
                "before them. Lower trainer.optimizer.lr, check the data, or resume "
                "from an earlier checkpoint."
            )

    def _export_at_end(self) -> Path | None:
        path = self.output_dir / "hf"
        # The values of the last step, not of a graph still running.
        self.backend.sync()
        self.backend.wait_device_ops()
        # Every process: gathering parameters split over processes takes them all.
        self.export_hf(path)
        if is_coordinator():
            log.info("export: HF folder written to %s", path)
        return path
