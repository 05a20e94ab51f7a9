"""Where a run's numbers go, and what it reports at the end.

The trainer hands `MetricsLogger.log` the values of a logged step (read on the host, in a step
closure); the logger adds throughput, step time, mfu and the compile count, writes the record
to metrics.jsonl (the coordinator only: the loss is global already) and to every sink (wandb),
and shows it on the progress bar, or as a log line where there is no terminal. At the end it
gives the figures of the summary.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from torchprime.backend.base import Backend
from trainers.hosts import is_coordinator
from trainers.metrics import MetricsFile, truncate_metrics
from trainers.spike import SIGNALS

log = logging.getLogger(__name__)

#: Metrics that are counts, written as integers.
COUNTS = ("skipped_steps", "skipped_rows", *(f"{s}_spike_skips" for s in SIGNALS))


class Sink(Protocol):
    """Somewhere else the records go (wandb)."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


@dataclass
class TrainSummary:
    """What a finished (or stopped) run reports, and train.py prints."""

    steps: int
    """The last step done (counting the steps of the runs this one resumed)."""
    max_steps: int
    start_step: int
    """The step this process started after (0, or the resumed checkpoint's)."""
    first_loss: float | None
    last_loss: float | None
    tokens_per_sec: float
    """Over the steps after the first one of this process (which includes compilation)."""
    elapsed_s: float
    compiles: int | None
    metrics_path: Path
    checkpoint: Path | None
    resumed_from: Path | None = None
    stopped: str | None = None
    """Why the run stopped before max_steps (SIGTERM, trainer.stop_at_step), if it did."""
    skipped_steps: int = 0
    hf_export: Path | None = None
    eval_best: tuple[int, float] | None = None
    """(step, held-out loss) of the lowest evaluation, when the run evaluated."""
    eval_last: tuple[int, float] | None = None
    """(step, held-out loss) of the last evaluation."""


class MetricsLogger:
    """The numbers of one training process: metrics.jsonl, sinks, progress, summary figures."""

    def __init__(
        self,
        path: Path,
        backend: Backend,
        tokens_per_step: int,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        progress_bar: bool = True,
        sinks: Sequence[Sink] = (),
    ):
        self.path = path
        self.backend = backend
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.show_bar = progress_bar and sys.stderr.isatty()
        """A bar on a terminal; logged lines instead in files and pod logs (no terminal)."""
        self.sinks = list(sinks)
        self._file: MetricsFile | None = None
        self._bar: tqdm | None = None
        self.losses: list[float | None] = []
        self.skipped_steps = 0
        self._window = (0, 0.0)  # (step, time) of the previous logged step
        self._steady: tuple[int, float] | None = None  # the first logged step's
        self._held: dict[str, Any] | None = None  # a step's record waiting for its evaluation
        self._eval_loss: float | None = None  # the last one, for the progress bar
        self._eval_seconds = 0.0  # spent evaluating since the first logged step

    def truncate(self, last_step: int) -> int:
        """Drop the records after `last_step` (a resumed run logs them again); returns how
        many were dropped. The coordinator edits the file; other hosts do nothing."""
        return truncate_metrics(self.path, last_step) if is_coordinator() else 0

    def start(self, start_step: int, max_steps: int) -> None:
        if is_coordinator():
            self._file = MetricsFile(self.path)
        self._window = (start_step, time.perf_counter())
        self._bar = tqdm(
            total=max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not self.show_bar,
        )

    def step_done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def log(self, step: int, values: dict[str, float], hold: bool = False) -> dict[str, Any]:
        """Record the host values of `step`; returns the record as written. `hold`: the step
        is evaluated next, and its record is written with the evaluation (`log_eval`)."""
        now = time.perf_counter()
        prev_step, prev_time = self._window
        elapsed = max(now - prev_time, 1e-9)
        steps = step - prev_step
        tokens_per_sec = steps * self.tokens_per_step / elapsed
        record = {
            "step": step,
            **{k: (int(v) if k in COUNTS else float(v)) for k, v in values.items()},
            "tokens_per_sec": tokens_per_sec,
            "step_time_s": elapsed / steps,
        }
        if self.flops_per_token and self.peak_flops:
            record["mfu"] = (
                tokens_per_sec
                * self.flops_per_token
                / (self.peak_flops * self.backend.device_count)
            )
        compiles = self.backend.compile_count()
        if compiles is not None:
            record["compiles"] = compiles
        if hold:
            self._flush_held()
            self._held = record
        else:
            self._write(record)
        self.losses.append(record.get("loss"))
        self.skipped_steps = record.get("skipped_steps", self.skipped_steps)
        self._window = (step, now)
        if self._steady is None:
            self._steady = (step, now)
        self._show(record)
        if not self.show_bar:
            log.info(
                "step %d  loss %.4f  lr %.2e  %.0f tok/s",
                step,
                record["loss"],
                record["lr"],
                tokens_per_sec,
            )
        return record

    def log_eval(self, step: int, values: dict[str, Any], seconds: float = 0.0) -> dict[str, Any]:
        """Add an evaluation's values to `step`'s record (held by `log`) and write it; a record
        of its own when the step was not logged. The evaluation's `seconds` are left out of
        the training throughput."""
        prev_step, prev_time = self._window
        self._window = (prev_step, prev_time + seconds)
        if self._steady is not None:
            self._eval_seconds += seconds
        if self._held is not None and self._held["step"] == step:
            # `compiles` stays the step's: a compilation of the evaluation shows in the next one
            record, self._held = {**self._held, **values}, None
        else:
            self._flush_held()
            record = {"step": step, **values}
        self._write(record)
        self._eval_loss = values.get("eval_loss")
        self._show(record)
        log.info(
            "step %d  eval loss %.4f  ppl %.2f  (%d tokens)",
            step,
            values["eval_loss"],
            values["eval_ppl"],
            values["eval_tokens"],
        )
        for sample in values.get("eval_samples") or []:
            log.info("step %d  sample %r -> %r", step, sample["prompt"], sample["text"])
        return record

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(record)
        for sink in self.sinks:
            sink.log(record)

    def _flush_held(self) -> None:
        if self._held is not None:
            self._write(self._held)
            self._held = None

    def _show(self, record: dict[str, Any]) -> None:
        if self._bar is None or "loss" not in record:
            return
        shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
        if self._eval_loss is not None:
            shown["eval_loss"] = f"{self._eval_loss:.4f}"
        self._bar.set_postfix(**shown)

    def close(self, failed: bool) -> None:
        self._flush_held()
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        for sink in self.sinks:
            sink.close(failed=failed)

    def steady_tokens_per_sec(self, start_step: int, step: int, elapsed: float) -> float:
        """Tokens/s from the first logged step (which compiles) to the last, evaluations left
        out; over the whole run when fewer than two steps were logged."""
        first_step, first_time = self._steady or (start_step, 0.0)
        last_step, last_time = self._window
        if last_step > first_step:
            span = last_time - first_time - self._eval_seconds
            return (last_step - first_step) * self.tokens_per_step / span
        return (step - start_step) * self.tokens_per_step / elapsed

    def summary(self, **fields: Any) -> TrainSummary:
        """The run's summary: the loss figures from the logged steps, plus `fields`."""
        losses = [x for x in self.losses if x is not None]
        return TrainSummary(
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
            compiles=self.backend.compile_count(),
            metrics_path=self.path,
            skipped_steps=self.skipped_steps,
            **fields,
        )


def format_summary(s: TrainSummary) -> str:
    """The summary a run prints when it ends."""
    lines = ["", f"run stopped ({s.stopped})" if s.stopped else "run finished"]
    if s.resumed_from:
        lines.append(f"  resumed from  {s.resumed_from}")
    lines.append(f"  steps         {s.steps}" + (f" of {s.max_steps}" if s.stopped else ""))
    if s.first_loss is not None and s.last_loss is not None:
        drop = 100 * (s.first_loss - s.last_loss) / s.first_loss if s.first_loss else 0.0
        lines.append(f"  loss          {s.first_loss:.4f} -> {s.last_loss:.4f} ({drop:.0f}% lower)")
    if s.eval_last is not None and s.eval_best is not None:
        lines.append(
            f"  eval loss     {s.eval_last[1]:.4f} (last, step {s.eval_last[0]}); best "
            f"{s.eval_best[1]:.4f} at step {s.eval_best[0]}"
        )
    if s.skipped_steps:
        lines.append(f"  skipped       {s.skipped_steps} steps (non-finite gradients)")
    lines += [
        f"  throughput    {s.tokens_per_sec:,.0f} tokens/s (after the first step)",
        f"  time          {s.elapsed_s:.1f} s",
    ]
    if s.compiles is not None:
        lines.append(f"  compilations  {s.compiles}")
    lines.append(f"  metrics       {s.metrics_path}")
    lines.append(f"  checkpoint    {s.checkpoint or '(none saved)'}")
    if s.hf_export:
        lines.append(f"  hf export     {s.hf_export}")
    if s.stopped:
        lines.append("  continue with the same command and trainer.resume=auto")
    return "\n".join(lines)
