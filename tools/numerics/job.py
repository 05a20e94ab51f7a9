"""A comparison from start to end: check the two sides, settle the weights and the batches, run
each side, compare.

Two ways to run the sides, the same numbers:
- `run_in_subprocesses` (the command line): each side in a process of its own, which saves its
  captured tensors to a file the parent compares. This is the robust way, and the default,
  because a process holds one XLA runtime: torch_xla reads its device count once, at import (an
  fsdp=4 side and an fsdp=8 side cannot share it); SPMD mode and the global mesh are
  process-wide; and torch's autograd engine sizes its device queues at the first backward pass,
  so a CPU backward before the XLA runtime is up breaks every later XLA backward in that process
  (README, "Why does the XLA runtime start before anything else?"). A process per side leaves
  none of this to chance, at the price of a process start (a few seconds) per side.
- `run_in_process`: both sides here, the XLA side first (so the XLA runtime is up before any
  backward). For tests and notebooks where XLA already runs with the devices both sides need.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.pipeline import TextBatches
from data.tokenizers import build_tokenizer
from tools.numerics.capture import Batch, build_side, capture
from tools.numerics.compare import Comparison, compare, format_growth, format_table
from tools.numerics.sides import (
    Side,
    check_batch_fits,
    check_same_model,
    check_seq_len,
    parse_side,
    side_mesh,
)
from tools.numerics.weights import INIT, kind_of, write_hf_folder
from torchprime.backend import resolve_backend_name
from torchprime.errors import ConfigError
from torchprime.sharding import BATCH_SPEC

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Job:
    a: Side
    """The reference."""
    b: Side
    weights: str = INIT
    """`init` (the seeded init of the config), an HF folder, a checkpoint or a run's folder."""
    seq_lens: list[int] = field(default_factory=lambda: [128])
    batch_size: int | None = None
    """Rows of the batch; None: the smallest count both meshes split (their data x fsdp)."""
    grads: bool = False
    tolerance: float = 1e-5
    tensors: list[str] = field(default_factory=list)
    """Glob patterns of the tensors to capture and compare; empty: all."""
    perturb: dict[str, float] = field(default_factory=dict)
    """Parameters of side b multiplied by 1 + factor: a deliberately broken side."""


@dataclass
class Result:
    a: str
    b: str
    """The sides as they ran (what, where, dtype)."""
    comparisons: list[Comparison]
    """One per sequence length."""

    @property
    def past_tolerance(self) -> bool:
        return any(c.first_past for c in self.comparisons)

    def text(self) -> str:
        parts = [f"{self.a} (the reference)\n{self.b}"]
        parts += [format_table(c) for c in self.comparisons]
        if len(self.comparisons) > 1:
            parts.append(format_growth(self.comparisons))
        return "\n\n".join(parts)

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "runs": [c.to_json() for c in self.comparisons]}


def new_job(a: str, b: str, shared: list[str] = (), **options) -> Job:
    """A job from the sides as written on the command line (see tools/numerics/sides.py)."""
    return Job(parse_side("a", a, list(shared)), parse_side("b", b, list(shared)), **options)


def check(job: Job) -> int:
    """Every check that needs no device; returns the batch's rows."""
    kind = kind_of(job.weights)
    check_same_model(job.a, job.b, seeded_init=kind == INIT)
    if job.tolerance < 0 or math.isnan(job.tolerance):
        raise ConfigError(f"--tol {job.tolerance}: must be 0 or more.")
    rows = job.batch_size
    if rows is None:
        ways = [side_mesh(s).size(BATCH_SPEC[0]) for s in (job.a, job.b)]
        rows = math.lcm(*ways)
    for side in (job.a, job.b):
        check_batch_fits(side, rows)
        for seq_len in job.seq_lens:
            check_seq_len(side, seq_len)
    return rows


def weights_folder(job: Job, tmp: Path) -> Path | None:
    """The HF folder every side loads, or None when our model draws the seeded init itself."""
    kind = kind_of(job.weights)
    if kind == "hf":
        return Path(job.weights)
    if kind == "checkpoint" or job.a.hf or job.b.hf:
        return write_hf_folder(job.weights, job.a.cfg, tmp / "weights")
    return None


def make_batches(side: Side, rows: int, seq_lens: list[int]) -> list[Batch]:
    """The first batch of the config's data at each sequence length: real text, so the
    activations have the spread training sees."""
    cfg = side.cfg
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    batches = []
    for seq_len in seq_lens:
        data = copy.deepcopy(cfg.data)
        data.block_size = seq_len
        data.logical_shards = None  # one shard a row of these few rows
        batches.append(next(iter(TextBatches(data, tokenizer, rows, 0, 1, cfg.seed))))
    return batches


def capture_side(
    side: Side,
    weights: Path | None,
    batches: list[Batch],
    grads: bool,
    tensors: list[str],
    perturb: dict[str, float],
) -> tuple[str, list[dict[str, torch.Tensor]]]:
    """(the side described, its captured tensors for each batch)."""
    built = build_side(side, weights, perturb)
    return built.describe(), [capture(built, b, grads, tensors) for b in batches]


def _side_options(job: Job, side: Side) -> dict:
    """capture_side's options for `side`: only side b is perturbed."""
    perturb = job.perturb if side.label == "b" else {}
    return {"grads": job.grads, "tensors": job.tensors, "perturb": perturb}


def _result(job: Job, rows: int, a, b) -> Result:
    comparisons = [
        compare(ca, cb, job.tolerance, seq_len, rows)
        for seq_len, ca, cb in zip(job.seq_lens, a[1], b[1])
    ]
    return Result(a[0], b[0], comparisons)


def _uses_xla(side: Side) -> bool:
    return not side.hf and resolve_backend_name(side.cfg.backend) == "xla"


def run_in_process(job: Job) -> Result:
    """Both sides in this process, the XLA side first (see this module's docstring)."""
    rows = check(job)
    with tempfile.TemporaryDirectory(prefix="numerics-") as tmp:
        weights = weights_folder(job, Path(tmp))
        batches = make_batches(job.a, rows, job.seq_lens)
        captured = {}
        for side in sorted((job.a, job.b), key=lambda s: not _uses_xla(s)):
            captured[side.label] = capture_side(side, weights, batches, **_side_options(job, side))
    return _result(job, rows, captured["a"], captured["b"])


def run_in_subprocesses(job: Job) -> Result:
    """Each side in a process of its own (tools/numerics/worker.py)."""
    rows = check(job)
    with tempfile.TemporaryDirectory(prefix="numerics-") as tmp:
        weights = weights_folder(job, Path(tmp))
        batches = make_batches(job.a, rows, job.seq_lens)
        captured = {}
        for side in (job.a, job.b):
            captured[side.label] = _run_worker(side, weights, batches, job, Path(tmp))
    return _result(job, rows, captured["a"], captured["b"])


def _run_worker(side: Side, weights: Path | None, batches: list[Batch], job: Job, tmp: Path):
    task, out = tmp / f"side_{side.label}.pt", tmp / f"captured_{side.label}.pt"
    torch.save(
        {
            "label": side.label,
            "text": side.text,
            "overrides": side.overrides,
            "hf": side.hf,
            "weights": str(weights) if weights else None,
            "batches": batches,
            "options": _side_options(job, side),
        },
        task,
    )
    # The side's backend sets the XLA device count from its own mesh.
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    proc = subprocess.run(
        [sys.executable, "-m", "tools.numerics.worker", str(task), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode == 2:
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        raise ConfigError(lines[-1].removeprefix("error: ") if lines else proc.stderr[-2000:])
    if proc.returncode != 0:
        raise RuntimeError(f"side {side.label} failed:\n{proc.stderr[-4000:]}")
    saved = torch.load(out)
    return saved["describe"], saved["captured"]
