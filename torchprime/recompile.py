"""The recompilation guard: after warm-up, every new XLA compilation is reported, with the step
and what changed, or stops the run.

A silent recompile makes every step slow (a Python number that changes each step, a shape that
varies, a branch on a value). The guard reads the runtime's compile counter after each step (a
host-side counter: no device sync) and hashes the step's graph before it runs. A new compile
whose step graph hash differs from the first post-warm-up step's means the training step itself
changed: both graphs (HLO text) are written to `dump_dir` to be compared. A new compile with the
same step hash came from outside the step (a checkpoint save, an evaluation, a value read).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from torchprime.backend.base import Backend

log = logging.getLogger(__name__)


class RecompileError(RuntimeError):
    """A compilation after warm-up, with trainer.fail_on_recompile=true."""


class RecompileGuard:
    def __init__(
        self,
        backend: Backend,
        warmup_steps: int = 2,
        fail: bool = False,
        dump_dir: Path | None = None,
    ):
        self.backend = backend
        self.warmup_steps = warmup_steps
        self.fail = fail
        self.dump_dir = dump_dir
        self.enabled = backend.is_xla
        self.compiles = backend.compile_count() or 0
        self.reference: tuple[bytes, str] | None = None  # (hash, HLO) of the steady step
        self.step_changed = False
        self.late_compiles = 0
        self.known_graphs: dict[str, int] = {}
        """Graphs outside the step compiled once by design (the evaluation's forward): their
        compile count the first time each ran."""

    def before_sync(self, step: int, tensors: list[torch.Tensor]) -> None:
        """Call with the step's outputs (loss, parameters, ...) just before the step runs."""
        if not self.enabled or step <= self.warmup_steps:
            return
        digest = self.backend.graph_hash(tensors)
        if self.reference is None:
            self.reference = (digest, self.backend.graph_text(tensors))
            return
        self.step_changed = digest != self.reference[0]
        if self.step_changed and self.dump_dir is not None:
            folder = self.dump_dir / f"recompile_step_{step:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "steady_step.hlo.txt").write_text(self.reference[1])
            (folder / "this_step.hlo.txt").write_text(self.backend.graph_text(tensors))

    def after_step(self, step: int, what: str = "") -> None:
        """Call after the step ran (and after anything else done at that step, such as a
        checkpoint, named by `what`)."""
        if not self.enabled:
            return
        count = self.backend.compile_count() or 0
        new, self.compiles = count - self.compiles, count
        if not new or step <= self.warmup_steps:
            self.step_changed = False
            return
        self.late_compiles += new
        if self.step_changed:
            where = f"; both graphs saved to {self.dump_dir}" if self.dump_dir else ""
            cause = (
                "the training step's graph changed (a Python number, shape or branch that "
                f"varies between steps is the usual cause){where}"
            )
        else:
            cause = f"a graph outside the training step ({what or 'not the step itself'})"
        message = f"{new} XLA compilation(s) at step {step}, after warm-up: {cause}."
        self.step_changed = False
        if self.fail:
            raise RecompileError(message + " (trainer.fail_on_recompile=true)")
        log.warning(message)

    def after_graph(self, step: int, what: str) -> None:
        """Call after a graph outside the training step ran at `step` (`what`: "the
        evaluation"). Its first run may compile (that graph's own warm-up, counted in
        `known_graphs`); any later compilation is reported like one after a step."""
        if not self.enabled:
            return
        if what not in self.known_graphs:
            count = self.backend.compile_count() or 0
            self.known_graphs[what] = count - self.compiles
            self.compiles = count
            if self.known_graphs[what]:
                log.info("%s compiled %d graph(s) at step %d", what, self.known_graphs[what], step)
            return
        self.after_step(step, what)
