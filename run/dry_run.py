"""Dry run: `python train.py +config=POD_PRESET dry_run=true` on a machine without the pod.

1. Every problem the config shows for its target, at once: the keys, the mesh against
   target.num_devices, the batch over the target's hosts and data-parallel devices, the
   attention kernel on the target chip, every sharding, remat and lr pattern on the real model
   (built on the meta device), a pretrained checkpoint's architecture, the data sources.
2. The sharding plan of the real model on the real mesh, judged against the chip's HBM.
3. Real steps on XLA with virtual CPU devices, on a shrunken model (2 layers, a small width,
   the head / kv-head ratio kept, every dimension divisible by the mesh) and the mesh folded
   to at most dry_run_devices with the same axes; the same specs, remat and scan, data
   pipeline and grad accumulation; a checkpoint saved mid-run and at the end, which a second
   run restores and continues; the recompile guard set to fail.
4. The step model: the collectives of the shrunken step, read from XLA's partitioned module
   and audited against the layout (torchprime/collectives.py), and the roofline of the real
   model's step on the target pod (torchprime/step_model.py), also written as JSON.
5. A one-screen report. Exit status 0 when nothing stands in the way, 1 otherwise (the step
   model's flags are advice: they do not fail the dry run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from data.tokenizers import Tokenizer
from models import build_model
from run.preflight import Devices, describe_activations, preflight
from run.stderr_tee import stderr_tee
from run.training import run_training
from torchprime.attention import TPU_KERNELS, AttentionKernel
from torchprime.backend import BackendName, select_backend
from torchprime.collectives import (
    Audit,
    HloParseError,
    audit,
    format_audit,
    parse_collectives,
    step_module,
)
from torchprime.errors import ConfigError
from torchprime.mesh import AXES, Mesh, MeshAxesConfig, fold_mesh, resolve_mesh
from torchprime.plan import FitVerdict, ShardingPlan, format_plan, make_plan
from torchprime.sharding import BATCH_SPEC, plan_parameter_specs
from torchprime.step_model import StepModel, format_step_model
from train_config import TargetConfig, TrainConfig
from trainers.base_trainer import TrainingError
from trainers.metrics_logger import TrainSummary
from trainers.profiling import hlo_dir, prune_compiler_dumps

log = logging.getLogger("dry_run")

#: Width of the shrunken model before rounding up to the mesh: small enough for many virtual
#: devices on a laptop, large enough that every sharded dimension is still split.
SMALL_HIDDEN, SMALL_INTERMEDIATE, SMALL_HEAD_DIM, SMALL_LAYERS, SMALL_BLOCK = 128, 256, 16, 2, 128
#: Marks a folder as the dry run's own, so a later dry run may replace it.
CONFIG_NAME = "dry_run_config.yaml"


@dataclass
class DryRunReport:
    target: str
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Checks not made because what they need failed."""
    notes: list[str] = field(default_factory=list)
    plan: ShardingPlan | None = None
    verdict: FitVerdict | None = None
    activations: str | None = None
    ran: str | None = None
    """The shrunken model and folded mesh the steps ran with."""
    first: TrainSummary | None = None
    resumed: TrainSummary | None = None
    seconds: float = 0.0
    step_model: StepModel | None = None
    """The roofline of the real model's step on the target pod."""
    audit: Audit | None = None
    """The collectives of the shrunken step, checked against the layout."""
    audit_notes: list[str] = field(default_factory=list)
    """What the audit could not read."""

    @property
    def ok(self) -> bool:
        return not self.problems and (self.verdict is None or self.verdict.fits)


def dry_run(cfg: TrainConfig) -> int:
    """Run the dry run of `cfg`, print the plan and the report; the process exit status."""
    start = time.perf_counter()
    report = DryRunReport(target=describe_target(cfg))
    pre = preflight(cfg, Devices.of_target(cfg.target))
    if pre.batches is not None:
        # The sources open and give a batch (one micro-batch of the first host).
        pre.problems.attempt(next, iter(pre.batches))
    report.problems += pre.problems
    report.skipped = pre.skipped
    report.plan, report.verdict = pre.plan, pre.verdict
    if pre.activations is not None:
        report.activations = describe_activations(pre.activations)
    if pre.plan is not None:
        print(format_plan(pre.plan, max_rows=12))
        if pre.verdict is None:
            report.notes.append("no target.chip or target.hbm_gib: the plan is not judged")
    report.step_model = pre.step_model
    if pre.plan is not None and pre.step_model is None:
        report.audit_notes.append(
            "the step's roofline needs target.chip (the chip's FLOP/s and bandwidths)"
        )
    if pre.ok:
        run_shrunken(cfg, pre.mesh, pre.tokenizer, report)
    report.seconds = time.perf_counter() - start
    print(format_report(report))
    write_step_model(report, dry_run_dir(cfg))
    return 0 if report.ok else 1


def describe_target(cfg: TrainConfig) -> str:
    t = cfg.target
    chip = f"TPU {t.chip}" if t.chip else "TPU (target.chip not set)"
    count = t.num_devices or "?"
    return f"{cfg.run_name}, for {chip} x {count} devices"


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


def shrunken(
    cfg: TrainConfig, mesh: Mesh, tokenizer: Tokenizer, out: Path
) -> tuple[TrainConfig, list[str]]:
    """The config the dry run trains: the same in kind as `cfg`, small enough for a CPU."""
    notes: list[str] = []
    folded = fold_mesh(mesh, cfg.dry_run_devices)
    if folded != mesh:
        notes.append(
            f"mesh {mesh.describe()} folded to {folded.describe()} ({folded.num_devices} "
            "virtual devices): torch_xla trains on at most 64 on a CPU"
        )
    devices = folded.num_devices  # every sharded dimension a multiple of it splits evenly
    m = cfg.model
    ratio = m.num_attention_heads // m.num_key_value_heads
    kv_heads = folded.shape["tensor"]
    while kv_heads * SMALL_HEAD_DIM % devices:
        kv_heads += folded.shape["tensor"]
    model = dataclasses.replace(
        m,
        num_hidden_layers=min(SMALL_LAYERS, m.num_hidden_layers),
        hidden_size=_round_up(SMALL_HIDDEN, devices),
        intermediate_size=_round_up(SMALL_INTERMEDIATE, devices),
        num_attention_heads=kv_heads * ratio,
        num_key_value_heads=kv_heads,
        head_dim=SMALL_HEAD_DIM,
        vocab_size=_round_up(tokenizer.vocab_size, devices),
        pretrained_path=None,
    )
    if m.pretrained_path:
        notes.append(
            "model.pretrained_path: architecture checked; the steps start from random weights"
        )
    if m.attention_kernel in TPU_KERNELS:
        model = dataclasses.replace(
            model, attention_kernel=AttentionKernel.eager, attention_block_sizes={}
        )
        notes.append(f"attention_kernel={m.attention_kernel} checked for the target; eager on CPU")
    if m.remat.offload_tensors:
        model.remat = dataclasses.replace(m.remat, offload_strict=False)
        notes.append("remat.offload_tensors: TPU only, so kept on the device here")
    # the row splits over context (into 2N chunks with load balancing)
    chunks = folded.shape["context"] * (2 if m.load_balance_context else 1)
    block = _round_up(min(cfg.data.block_size, SMALL_BLOCK), chunks)
    if m.loss_chunk_size is not None and m.loss_chunk_size >= block - 1:
        # The shrunken rows are shorter than a chunk: cut them in 4 so the chunks still run.
        model.loss_chunk_size = max(1, block // 4)
        notes.append(f"model.loss_chunk_size: {model.loss_chunk_size} for the {block}-token rows")
    steps = cfg.dry_run_steps
    t = cfg.trainer
    data_ways = folded.size(BATCH_SPEC[0])
    trainer = dataclasses.replace(
        t,
        max_steps=steps,
        global_batch_size=data_ways * t.grad_accum_steps,
        logging_steps=1,
        progress_bar=False,
        resume="never",
        stop_at_step=None,
        fail_on_recompile=True,
        peak_flops_per_device=None,
        lr_scheduler=dataclasses.replace(
            t.lr_scheduler, warmup_steps=1, decay_steps=None, decay_fraction=None
        ),
        checkpoint=dataclasses.replace(t.checkpoint, interval=steps // 2, keep=None),
    )
    small = dataclasses.replace(
        cfg,
        backend=BackendName.xla,
        cpu_devices=devices,
        ici_mesh=MeshAxesConfig(**dict(zip(AXES, folded.ici))),
        dcn_mesh=MeshAxesConfig(),
        dry_run=False,
        target=TargetConfig(),
        output_dir=str(out),
        model=model,
        # the shrunken batch sets its own shard count (the target's was checked for the pod)
        data=dataclasses.replace(cfg.data, block_size=block, logical_shards=None),
        trainer=trainer,
        wandb=dataclasses.replace(cfg.wandb, enabled=False),
    )
    if cfg.wandb.enabled:
        notes.append("wandb: settings checked, nothing logged")
    return small, notes


def dry_run_dir(cfg: TrainConfig) -> Path:
    """output_dir/dry_run, or outputs/dry_run/RUN_NAME when output_dir is not local."""
    if "://" in cfg.output_dir:
        return Path("outputs") / "dry_run" / cfg.run_name
    return Path(cfg.output_dir) / "dry_run"


def run_shrunken(cfg: TrainConfig, mesh: Mesh, tokenizer: Tokenizer, report: DryRunReport) -> None:
    out = dry_run_dir(cfg)
    if out.exists():
        if not (out / CONFIG_NAME).exists():
            report.problems.append(f"{out} exists and is not a dry run's folder; move it away.")
            return
        shutil.rmtree(out)  # the previous dry run's
    small, notes = shrunken(cfg, mesh, tokenizer, out)
    report.notes += notes
    m = small.model
    ran_mesh = resolve_mesh(small.ici_mesh, small.dcn_mesh, None)  # the folded one
    report.ran = (
        f"{m.num_hidden_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads / "
        f"{m.num_key_value_heads} kv, vocab {m.vocab_size}, {small.data.block_size} tokens x "
        f"{small.trainer.global_batch_size} rows; mesh {ran_mesh.describe()}"
    )
    out.mkdir(parents=True)
    (out / CONFIG_NAME).write_text(OmegaConf.to_yaml(OmegaConf.structured(small)))
    dump = hlo_dir(out) / "xla"  # the partitioned modules the audit reads
    # The partitioner's warnings (involuntary rematerialization) are C++ log lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    try:
        with stderr_tee(out / "xla_log.txt"):
            backend = select_backend("xla", cpu_devices=small.cpu_devices, hlo_dump_dir=dump)
            if backend.device_count != small.cpu_devices:
                report.problems.append(
                    f"the XLA runtime here has {backend.device_count} devices, the dry run "
                    f"needs {small.cpu_devices}: run it in a fresh process."
                )
                return
            report.first = run_training(small, backend, out, {})
            more = dataclasses.replace(
                small,
                trainer=dataclasses.replace(
                    small.trainer, max_steps=small.trainer.max_steps + 1, resume="auto"
                ),
            )
            report.resumed = run_training(more, backend, out, {})
    except (ConfigError, TrainingError) as e:
        report.problems.append(f"shrunken run: {e}")
        return
    except Exception as e:  # what the TPU would have hit too: say it, with the trace above
        log.exception("the shrunken run failed")
        report.problems.append(f"shrunken run failed: {type(e).__name__}: {e}")
        return
    if report.resumed.resumed_from != report.first.checkpoint:
        report.problems.append(
            f"restore: the second run started from {report.resumed.resumed_from}, not from the "
            f"checkpoint saved at the end, {report.first.checkpoint}"
        )
    audit_shrunken(small, ran_mesh, dump, out / "xla_log.txt", report)


def audit_shrunken(small: TrainConfig, mesh: Mesh, dump: Path, log: Path, r: DryRunReport) -> None:
    """The collective audit of the shrunken step: what could not be read is said, never fatal."""
    prune_compiler_dumps(dump)
    module = step_module(dump) if dump.is_dir() else None
    if module is None:
        r.audit_notes.append(f"no partitioned module in {dump}: the collectives were not audited")
        return
    m = small.model
    meta = build_model(m, small.resolved_precision.params)
    plan = make_plan(meta, plan_parameter_specs(meta, m.sharding, mesh), mesh)
    log_text = log.read_text(errors="replace") if log.exists() else ""
    try:
        found = parse_collectives(module.read_text(), mesh, str(module))
    except HloParseError as e:
        r.audit_notes.append(f"the collectives were not audited: {e}")
        return
    r.audit = audit(found, plan, m.num_hidden_layers, str(module), log_text)


def write_step_model(r: DryRunReport, out: Path) -> None:
    """output_dir/dry_run/step_model.json: the roofline and the audit, for scripts."""
    if not out.is_dir():
        return
    doc = {
        "step_model": r.step_model.to_json() if r.step_model else None,
        "audit": dataclasses.asdict(r.audit) if r.audit else None,
        "not_computed": r.audit_notes,
    }
    (out / "step_model.json").write_text(json.dumps(doc, indent=1))


def format_report(r: DryRunReport) -> str:
    lines = ["", f"dry run: {r.target}"]
    if r.plan is not None:
        p = r.plan
        lines.append(
            f"  plan        {p.total_parameters / 1e9:.2f}B parameters on mesh {p.mesh.describe()}"
            f" ({p.mesh.num_devices} devices)"
        )
    if r.activations is not None:
        lines.append(f"  activations {r.activations}")
    if r.verdict is not None:
        lines.append(f"  memory      {r.verdict.text}")
    if r.ran:
        lines.append(f"  shrunken    {r.ran}")
    if r.first is not None and r.resumed is not None:
        f, s = r.first, r.resumed
        lines += [
            f"  steps       {f.steps} steps, loss {f.first_loss:.4f} -> {f.last_loss:.4f}; "
            f"restored {s.resumed_from.name} and ran step {s.steps}",
            f"  compiles    {f.compiles} in the first run, {s.compiles - f.compiles} more after "
            "the restore; none after warm-up (the guard was set to fail)",
            f"  checkpoints {f.checkpoint.parent}",
        ]
    for note in r.notes:
        lines.append(f"  note        {note}")
    if r.audit is not None:
        lines.append("  " + format_audit(r.audit).replace("\n", "\n  "))
    if r.step_model is not None:
        lines.append("  " + format_step_model(r.step_model).replace("\n", "\n  "))
    for note in r.audit_notes:
        lines.append(f"  not computed {note}")
    if r.problems:
        lines.append(f"  PROBLEMS    {len(r.problems)}")
        lines += [f"    - {p}" for p in r.problems]
    if r.skipped:
        lines.append("  not checked until those are fixed:")
        lines += [f"    - {s}" for s in r.skipped]
    lines.append(f"  time        {r.seconds:.1f} s")
    flags = len(r.audit.flags) if r.audit else 0
    if r.ok and flags:
        lines.append(f"verdict: no problem found; read the {flags} step-model flag(s) above first")
    elif r.ok:
        lines.append("verdict: no problem found; run it on the pod")
    else:
        lines.append("verdict: fix the problems above before paying for the pod")
    return "\n".join(lines)
