"""A checked config becomes a running trainer: the assembly steps, in the order they apply.

1. pre-flight (run/preflight.py): every check, the meta model, the plan, this host's data;
2. the weights: the meta model laid out by module where the engine does so (torch.distributed:
   tensor parallelism and FSDP2, `Backend.parallelize`), then each module initialized on the
   host (from the seed, or read from an HF folder) and sent to the devices already sharded
   (torchprime/materialize.py);
3. activation sharding annotations and, with context parallelism, the sequence layout handed
   to attention (torchprime/context.py), then the rewriting for compile time and memory (XLA
   linear, remat, scan, offload, barriers: torchprime/rewriting.py), then the mesh handed to
   the Pallas attention kernels;
4. the trainer, given its checkpoint manager, metrics logger and step callbacks; it restores
   the checkpoint `trainer.resume` names and trains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from run.preflight import Devices, Preflight, preflight
from torchprime.attention import TPU_KERNELS, KernelPlacement, place_kernels
from torchprime.backend.base import Backend
from torchprime.context import SequenceLayout, context_size, place_sequence_layout
from torchprime.materialize import materialize
from torchprime.precision import autocast_forward
from torchprime.rewriting import apply_rewriting
from torchprime.sharding import replicated, shard_activations
from train_config import TrainConfig
from trainers import make_trainer
from trainers.base_trainer import BaseTrainer
from trainers.callbacks import StepCallback
from trainers.evaluator import Evaluator
from trainers.hosts import gather_from_hosts, is_coordinator
from trainers.metrics import model_flops_per_token, peak_flops
from trainers.metrics_logger import TrainSummary
from trainers.profiling import GraphDumper, StepProfiler, hlo_dir, prune_compiler_dumps

log = logging.getLogger(__name__)


def run_training(
    cfg: TrainConfig,
    backend: Backend,
    output_dir: Path,
    resolved: dict[str, Any],
    callbacks: Sequence[StepCallback] = (),
) -> TrainSummary:
    """Check `cfg` on `backend`'s devices (every problem in one ConfigError, nothing written
    before), then build the trainer and train; `resolved` is the config wandb records."""
    pre = preflight(cfg, Devices.of_backend(backend), output_dir=output_dir)
    add_other_processes_problems(pre)
    pre.raise_if_problems()
    output_dir.mkdir(parents=True, exist_ok=True)
    if is_coordinator():
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    log.info("backend: %s, mesh: %s", backend.describe(), pre.mesh.describe())
    trainer = build_trainer(pre, backend, output_dir, resolved, callbacks)
    trainer.restore()
    try:
        return trainer.train()
    finally:
        # The runtime's compile, transfer and execution counters: the first thing to read when
        # a run is slower than expected.
        if (report := backend.metrics_report()) is not None:
            try:
                (output_dir / f"xla_metrics_{backend.process_index:05d}.txt").write_text(report)
            except OSError as e:  # a full disk: the run's own error says so
                log.warning("the XLA metrics report was not written: %s", e)
        if cfg.debug.dump_hlo and not backend.device_kind.startswith("TPU"):
            prune_compiler_dumps(hlo_dir(output_dir) / "xla")


def add_other_processes_problems(pre: Preflight) -> None:
    """Every process stops when one found a problem (its own data, say): the others would
    otherwise wait for it in their first collective."""
    for rank, problems in enumerate(gather_from_hosts(list(pre.problems))):
        for problem in problems:
            if problem not in pre.problems:
                pre.problems.append(f"process {rank}: {problem}")


def build_trainer(
    pre: Preflight,
    backend: Backend,
    output_dir: Path,
    resolved: dict[str, Any],
    callbacks: Sequence[StepCallback] = (),
) -> BaseTrainer:
    """Steps 2 to 4 of this module's story, for a pre-flight without problems."""
    cfg, mesh = pre.cfg, pre.mesh
    model = place_model(pre, backend)
    precision = cfg.resolved_precision

    sinks = []
    if cfg.wandb.enabled and is_coordinator():
        from trainers.wandb_logger import WandbLogger

        sinks.append(WandbLogger(cfg.wandb, cfg.run_name, output_dir, resolved))
    return make_trainer(
        cfg.trainer,
        model,
        backend,
        mesh,
        pre.batches,
        output_dir,
        tokens_per_step=cfg.trainer.global_batch_size * cfg.data.block_size,
        flops_per_token=model_flops_per_token(model, cfg.data.block_size),
        peak_flops=peak_flops(backend.device_kind, cfg.trainer.peak_flops_per_device),
        sinks=sinks,
        optimizer_state_dtype=precision.optimizer_state,
        callbacks=[
            StepProfiler(cfg.profile, backend, output_dir),
            GraphDumper(cfg.debug, backend, output_dir),
            *callbacks,
        ],
        evaluator=(
            Evaluator(cfg.eval, pre.eval_batches, backend, mesh, pre.tokenizer, cfg.data.add_bos)
            if pre.eval_batches is not None
            else None
        ),
    )


def place_model(pre: Preflight, backend: Backend) -> nn.Module:
    """Steps 2 and 3 of this module's story: the pre-flight's meta model with its weights on
    the devices (seeded init, or `model.pretrained_path`), sharded, annotated and rewritten,
    ready for a forward pass. Training and the numerics tool (tools/numerics) both build the
    model here."""
    cfg, mesh, model = pre.cfg, pre.mesh, pre.model
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    backend.parallelize(model, pre.specs, mesh)
    if cfg.model.pretrained_path:
        from models.hf import hf_weights_init

        weights = hf_weights_init(cfg.model.pretrained_path)
        materialize(model, pre.specs, mesh, backend, weights, generator)
        weights.check_all_used()
        log.info("model: weights from %s", cfg.model.pretrained_path)
    else:
        materialize(model, pre.specs, mesh, backend, model.init_module_weights, generator)
    n_params = sum(p.numel() for p in model.parameters())
    precision = cfg.resolved_precision
    log.info("model: %s, %.2fM parameters", cfg.model.name, n_params / 1e6)
    log.info("precision: %s", precision.describe())
    if backend.is_xla:
        shard_activations(model, pre.activation_specs, mesh, backend)
        if left := replicated(pre.specs):
            log.info(
                "sharding: %d parameters replicated (no pattern): %s", len(left), ", ".join(left)
            )
    if context_size(mesh) > 1:
        model.loss_position_groups = context_size(mesh)
        if cfg.model.attention_kernel not in TPU_KERNELS:
            place_sequence_layout(model, SequenceLayout(backend, mesh))
    apply_rewriting(model, cfg.model.remat, backend, pre.specs, mesh)
    autocast_forward(model, precision, backend.device.type)
    if cfg.model.attention_kernel in TPU_KERNELS:
        place_kernels(model, KernelPlacement(backend, mesh, pre.qkv_spec))
    return model
