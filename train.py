"""Pretrain a model: `python train.py [+config=NAME] [group=option] [key=value ...]`.

The story of one run: compose and check the config, pick the backend, build the mesh, build the
model and shard it, stream the data, train, report.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data.pipeline import TextBatches
from data.tokenizers import Tokenizer, build_tokenizer
from models import build_model
from models.memory import ActivationEstimate, estimate_activations
from optimizers.groups import param_groups
from torchprime.attention import check_attention_kernel
from torchprime.backend import select_backend
from torchprime.backend.base import Backend
from torchprime.errors import ConfigError
from torchprime.mesh import Mesh, resolve_mesh
from torchprime.materialize import materialize
from torchprime.plan import (
    TPU_HBM_GIB,
    ShardingPlan,
    fit_verdict,
    format_bytes,
    format_plan,
    make_plan,
)
from torchprime.rewriting import apply_rewriting, check_remat
from torchprime.sharding import (
    BATCH_SPEC,
    check_batch_divisible,
    plan_activation_specs,
    plan_parameter_specs,
    replicated,
    shard_activations,
)
from train_config import (
    DTYPES,
    TrainConfig,
    check_batch_split,
    mesh_size,
    register_schema,
    validate,
)
from trainers import get_trainer_class
from trainers.base_trainer import TrainingError, TrainSummary
from trainers.profiling import GraphDumper, StepProfiler, hlo_dir, prune_compiler_dumps

log = logging.getLogger("train")
register_schema()


@hydra.main(config_path="configs", config_name="default", version_base=None)
def main(raw: DictConfig) -> None:
    try:
        if raw.get("dry_run"):
            from dry_run import dry_run

            sys.exit(dry_run(OmegaConf.to_object(raw)))
        summary = run(raw)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_summary(summary))


def run(raw: DictConfig) -> TrainSummary:
    # 1. The config: typed by the schema (Hydra already rejected unknown keys), then checked
    #    across keys. Nothing touches a device before it is known to be sound.
    cfg: TrainConfig = OmegaConf.to_object(raw)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    validate(cfg, tokenizer.vocab_size)
    if cfg.plan_only:
        print(sharding_plan(cfg))
        sys.exit(0)
    output_dir = Path(cfg.output_dir)
    check_no_previous_run(output_dir, cfg.trainer.resume)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw, resolve=True))
    backend = select_backend(
        cfg.backend,
        cpu_devices=cfg.cpu_devices or mesh_size(cfg) or 1,
        hlo_dump_dir=hlo_dir(output_dir) / "xla" if cfg.debug.dump_hlo else None,
    )
    check_target(cfg, backend)
    return train(cfg, backend, tokenizer, output_dir, OmegaConf.to_container(raw, resolve=True))


def train(
    cfg: TrainConfig, backend: Backend, tokenizer: Tokenizer, output_dir: Path, resolved: dict
) -> TrainSummary:
    """Steps 2 to 5 of the story, for a checked config; `resolved` is what wandb records."""
    # 2. The mesh. On XLA it must cover every device; eager backends run on one device and
    #    only check the mesh against the model and batch.
    mesh = resolve_mesh(
        cfg.ici_mesh, cfg.dcn_mesh, backend.device_count if backend.is_xla else None
    )
    check_batch_divisible(cfg.trainer.global_batch_size, mesh)
    micro_batch = check_batch_split(cfg, mesh, backend.process_count)
    check_attention_kernel(
        cfg.model.attention_kernel,
        cfg.model.attention_block_sizes,
        backend.device_kind,
        cfg.model.is_causal,
        cfg.data.block_size,
        uses_bias=cfg.data.packing == "document",  # documents kept apart by a bias
    )
    log.info("backend: %s, mesh: %s", backend.describe(), mesh.describe())

    # The data before the model: a wrong path or an empty source fails in seconds, not after
    # the weights are built. This host's part of the stream, in micro-batches of its share of
    # the global batch (grad_accum_steps of them make one step).
    batches = TextBatches(
        cfg.data, tokenizer, micro_batch, backend.process_index, backend.process_count, cfg.seed
    )

    # 3. The model: shapes on the meta device, sharding planned and checked there, then each
    #    module initialized on the host (from the seed, or read from an HF checkpoint) and sent
    #    to the devices as shards.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, DTYPES[cfg.dtype])
    specs = plan_parameter_specs(model, cfg.model.sharding, mesh)
    opt = cfg.trainer.optimizer
    param_groups(model, opt.weight_decay, dict(opt.lr_multipliers))  # patterns checked on meta
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.model.pretrained_path:
        from models.hf import check_matches, hf_weights_init

        check_matches(cfg.model, cfg.model.pretrained_path)
        weights = hf_weights_init(cfg.model.pretrained_path)
        materialize(model, specs, mesh, backend, weights, generator)
        weights.check_all_used()
        log.info("model: weights from %s", cfg.model.pretrained_path)
    else:
        materialize(model, specs, mesh, backend, model.init_module_weights, generator)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM parameters, %s", cfg.model.name, n_params / 1e6, cfg.dtype)
    activation_specs = plan_activation_specs(model, cfg.model.sharding)
    if backend.is_xla:
        shard_activations(model, activation_specs, mesh, backend)
    if backend.is_xla and (left := replicated(specs)):
        log.info("sharding: %d parameters replicated (no pattern): %s", len(left), ", ".join(left))

    # 4. Rewriting for compile time and memory: XLA linear, remat, scan, barriers (in that
    #    order; torchprime/rewriting.py), before the optimizer sees the parameters.
    apply_rewriting(model, cfg.model.remat, backend)

    # 5. Train: from the checkpoint trainer.resume names, if any; metrics to metrics.jsonl
    #    and, on the first host, to wandb (the same wandb run when resuming).
    trainer = get_trainer_class(cfg.trainer.name)(
        cfg.trainer,
        model,
        backend,
        mesh,
        batches,
        output_dir,
        tokens_per_step=cfg.trainer.global_batch_size * cfg.data.block_size,
        seq_len=cfg.data.block_size,
    )
    trainer.profiler = StepProfiler(cfg.profile, backend, output_dir)
    trainer.restore()
    # The steps that compile: the first of this process and the one after.
    trainer.graph_dumper = GraphDumper(cfg.debug, backend, output_dir, trainer.start_step + 2)
    if cfg.wandb.enabled and backend.process_index == 0:
        from trainers.wandb_logger import WandbLogger

        trainer.loggers.append(WandbLogger(cfg.wandb, cfg.run_name, output_dir, resolved))
    try:
        return trainer.train()
    finally:
        # The runtime's compile, transfer and execution counters: the first thing to read when
        # a run is slower than expected.
        if (report := backend.metrics_report()) is not None:
            (output_dir / f"xla_metrics_{backend.process_index:05d}.txt").write_text(report)
        if cfg.debug.dump_hlo and not backend.device_kind.startswith("TPU"):
            prune_compiler_dumps(hlo_dir(output_dir) / "xla")


def sharding_plan(cfg: TrainConfig) -> str:
    """The plan for the configured mesh, from the model on the meta device (nothing allocated);
    every sharding and remat name is checked on the way."""
    mesh = resolve_mesh(cfg.ici_mesh, cfg.dcn_mesh, cfg.target.num_devices)
    model = build_model(cfg.model, DTYPES[cfg.dtype])
    specs = plan_parameter_specs(model, cfg.model.sharding, mesh)
    plan_activation_specs(model, cfg.model.sharding)
    check_remat(model, cfg.model.remat)
    plan = plan_for(cfg, model, specs, mesh)
    text = format_plan(plan)
    activations = activation_estimate(cfg, mesh)
    text += "\n  activations: " + describe_activations(activations)
    if (hbm := target_hbm(cfg)) is not None:
        text += "\n  " + fit_verdict(plan, *hbm, activations.device_bytes).text
    return text


def activation_estimate(cfg: TrainConfig, mesh: Mesh) -> ActivationEstimate:
    """The activations of one micro-batch on one device, estimated (models/memory.py)."""
    rows = cfg.trainer.global_batch_size / cfg.trainer.grad_accum_steps / mesh.size(BATCH_SPEC[0])
    return estimate_activations(
        cfg.model, cfg.model.remat, mesh, rows, cfg.data.block_size, DTYPES[cfg.dtype].itemsize
    )


def describe_activations(a: ActivationEstimate) -> str:
    text = (
        f"{format_bytes(a.kept_bytes)} kept for backward + {format_bytes(a.working_bytes)} for "
        "one layer and the logits"
    )
    if a.host_bytes:
        text += f", {format_bytes(a.host_bytes)} offloaded to host memory"
    return text + f" (estimate, {a.tokens:,} tokens a device)"


def plan_for(cfg: TrainConfig, model: torch.nn.Module, specs: dict, mesh: Mesh) -> ShardingPlan:
    state_dtype = cfg.trainer.optimizer.state_dtype
    return make_plan(model, specs, mesh, DTYPES[state_dtype] if state_dtype else None)


def target_hbm(cfg: TrainConfig) -> Optional[tuple[float, str]]:
    """Bytes of HBM per chip of the target and how to name it, when the config says."""
    t = cfg.target
    if t.hbm_gib is not None:
        return t.hbm_gib * 2**30, f"target.hbm_gib={t.hbm_gib:g}"
    if t.chip is not None:
        return TPU_HBM_GIB[t.chip] * 2**30, f"a TPU {t.chip} chip"
    return None


def check_target(cfg: TrainConfig, backend: Backend) -> None:
    """A config written for a pod (target.*) runs on that pod: the same chip count, and not
    by mistake on a CPU, where an 8B model would grind for hours before running out of memory."""
    t = cfg.target
    if not backend.device_kind.startswith("TPU"):
        if t.chip is not None or t.num_devices is not None:
            raise ConfigError(
                f"this config is for a TPU pod (target.chip={t.chip}, target.num_devices="
                f"{t.num_devices}) and the devices here are {backend.device_kind}: check it "
                "here with dry_run=true, or clear target.chip and target.num_devices to run it "
                "on these devices anyway."
            )
        return
    if t.num_devices is not None and backend.device_count != t.num_devices:
        raise ConfigError(
            f"target.num_devices={t.num_devices}, but this pod has {backend.device_count} "
            f"chips ({backend.device_kind}): run the config made for it, or fix the target."
        )
    if t.chip is not None and t.chip not in backend.device_kind:
        log.warning(
            "target.chip=%s, but the chips here are %s: the plan's HBM verdict was for %s.",
            t.chip, backend.device_kind, t.chip,
        )


def check_no_previous_run(output_dir: Path, resume: str = "never") -> None:
    """Refuse to write over another run's metrics or checkpoints, unless asked to resume it
    (trainer.resume=auto or a checkpoint: the run continues in place)."""
    if resume != "never":
        return
    found = [p.name for p in (output_dir / "metrics.jsonl", output_dir / "checkpoints") if p.exists()]
    if found:
        raise ConfigError(
            f"output_dir={output_dir} already holds a run ({', '.join(found)}); continue it with "
            "trainer.resume=auto, or choose another output_dir or run_name, or move that run "
            "away. Nothing was changed."
        )


def format_summary(s: TrainSummary) -> str:
    lines = ["", f"run stopped ({s.stopped})" if s.stopped else "run finished"]
    if s.resumed_from:
        lines.append(f"  resumed from  {s.resumed_from}")
    lines.append(f"  steps         {s.steps}" + (f" of {s.max_steps}" if s.stopped else ""))
    if s.first_loss is not None and s.last_loss is not None:
        drop = 100 * (s.first_loss - s.last_loss) / s.first_loss if s.first_loss else 0.0
        lines.append(f"  loss          {s.first_loss:.4f} -> {s.last_loss:.4f} ({drop:.0f}% lower)")
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


if __name__ == "__main__":
    main()
