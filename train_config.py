"""The schema of a run's config and the checks made before anything runs.

Hydra composes configs/default.yaml on top of `TrainConfig` (registered as `schema`), so an
unknown key or a value of the wrong type fails at start-up with the key's name. The checks in
`validate` then look across keys (mesh vs batch, model vs data, ...) and report every problem
at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore

from collators import COLLATORS
from data.config import DataConfig
from data.packing import PACKINGS
from models.llama import LlamaConfig
from torchprime.errors import ConfigError
from torchprime.mesh import Mesh, MeshAxesConfig
from torchprime.plan import TPU_HBM_GIB
from torchprime.sharding import BATCH_SPEC
from trainers.config import DebugConfig, ProfileConfig, TrainerConfig, WandbConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: torch_xla 2.9 trains on up to 64 virtual CPU devices; at 128 its autograd engine asserts.
MAX_CPU_DEVICES = 64


@dataclass
class TargetConfig:
    """The hardware a config is written for, so a machine without it can check the config
    (plan_only, dry_run) and the real run can check it landed on the right pod."""

    chip: Optional[str] = None
    """TPU generation: v4, v5e, v5p or v6e (sets the HBM per chip); null: not said."""
    num_devices: Optional[int] = None
    """Chips of the whole pod, all slices (v5p-128 has 64 chips: one device per chip). Fills a
    -1 mesh axis in plan_only and dry_run; a TPU run on another count stops at start-up."""
    hbm_gib: Optional[float] = None
    """HBM per chip in GiB, overriding the chip's figure (v4 32, v5e 16, v5p 95, v6e 32)."""


@dataclass
class TrainConfig:
    """A whole run. Groups: model (with model/sharding), data, trainer; presets: +config=NAME."""

    seed: int = 42
    """Seeds the weight init and everything random in training."""
    backend: str = "auto"
    """auto, xla, cpu or cuda. auto: XLA on a TPU host, CUDA when a GPU is visible, else XLA on
    virtual CPU devices when torch_xla is installed (real SPMD), else plain PyTorch on the CPU."""
    cpu_devices: Optional[int] = None
    """Virtual devices for XLA on the CPU (CPU_NUM_DEVICES); null: as many as the mesh has.
    Ignored on TPU, where the chips are counted."""
    dtype: str = "float32"
    """Model parameter dtype: float32 or bfloat16."""
    ici_mesh: MeshAxesConfig = field(default_factory=lambda: MeshAxesConfig(fsdp=4))
    """Mesh axes inside a slice (fast interconnect)."""
    dcn_mesh: MeshAxesConfig = field(default_factory=MeshAxesConfig)
    """Mesh axes across slices (data-center network); all 1 on a single slice."""
    plan_only: bool = False
    """Print the sharding plan (per-parameter specs and shards, per-device bytes) for the mesh
    as configured, computed on the meta device, and exit: no device, no weights, no TPU."""
    dry_run: bool = False
    """Check the config for its target pod here, without a TPU: every problem at once, the
    sharding plan against the chip's HBM, then dry_run_steps real steps of a shrunken model
    on virtual CPU devices with the same mesh axes, specs, remat, data, checkpoint save and
    restore and the recompile guard; ends with a one-screen report (dry_run.py)."""
    dry_run_steps: int = 6
    """Training steps of the dry run (then one more after restoring its checkpoint)."""
    dry_run_devices: int = 64
    """Most virtual CPU devices the dry run uses; larger meshes are folded to fit (same axes)."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """The pod the config is for."""
    run_name: str = "run"
    """Names the run (output folder, wandb). configs/default.yaml makes it the start time, so
    every run gets a new folder; name it yourself to find the run again."""
    output_dir: str = "outputs/${run_name}"
    """Where config.yaml, metrics.jsonl, checkpoints/ and the log go."""
    model: LlamaConfig = field(default_factory=LlamaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging (off by default)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """A profiler trace of a few steps (off by default)."""
    debug: DebugConfig = field(default_factory=DebugConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="schema", node=TrainConfig)


def mesh_size(cfg: TrainConfig) -> Optional[int]:
    """Devices the mesh asks for, or None when an axis is -1 (it fills the devices there are)."""
    sizes = list(vars(cfg.ici_mesh).values()) + list(vars(cfg.dcn_mesh).values())
    if -1 in sizes:
        return None
    total = 1
    for n in sizes:
        total *= n
    return total


def check_batch_split(cfg: TrainConfig, mesh: Mesh, process_count: int) -> int:
    """The rows of one micro-batch on this host. The global batch must split into
    grad_accum_steps micro-batches, each over the data-parallel devices and the hosts."""
    t = cfg.trainer
    ways = mesh.size(BATCH_SPEC[0])
    parts = t.grad_accum_steps * ways
    if t.global_batch_size % parts or t.global_batch_size % (t.grad_accum_steps * process_count):
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} does not split into "
            f"trainer.grad_accum_steps={t.grad_accum_steps} micro-batches over the {ways} "
            f"data-parallel devices (data x fsdp) of mesh {mesh.describe()}: it must be a "
            f"multiple of {parts}."
        )
    return t.global_batch_size // process_count // t.grad_accum_steps


def validate(cfg: TrainConfig, tokenizer_vocab_size: int) -> None:
    """Checks across keys; raises one ConfigError listing every problem found."""
    raise_problems(find_problems(cfg, tokenizer_vocab_size))


def raise_problems(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n  - " + "\n  - ".join(problems))


def find_problems(cfg: TrainConfig, tokenizer_vocab_size: int) -> list[str]:
    """Every problem the keys show between them, without a device or a model."""
    problems: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    check(cfg.dtype in DTYPES, f"dtype={cfg.dtype!r}: choose one of {', '.join(DTYPES)}.")
    t = cfg.trainer
    check(t.max_steps >= 1, f"trainer.max_steps={t.max_steps}: must be at least 1.")
    check(t.logging_steps >= 1, f"trainer.logging_steps={t.logging_steps}: must be at least 1.")
    check(
        t.global_batch_size >= 1,
        f"trainer.global_batch_size={t.global_batch_size}: must be at least 1.",
    )
    check(
        t.checkpoint.interval is None or t.checkpoint.interval >= 1,
        f"trainer.checkpoint.interval={t.checkpoint.interval}: must be at least 1 (or null).",
    )
    check(
        t.max_grad_norm is None or t.max_grad_norm > 0,
        f"trainer.max_grad_norm={t.max_grad_norm}: must be positive (or null).",
    )
    for key, value in (
        ("max_grad_value", t.max_grad_value),
        ("peak_flops_per_device", t.peak_flops_per_device),
    ):
        check(value is None or value > 0, f"trainer.{key}={value}: must be positive (or null).")
    for key, value in (
        ("grad_accum_steps", t.grad_accum_steps),
        ("max_consecutive_skips", t.max_consecutive_skips),
        ("stop_at_step", t.stop_at_step),
        ("checkpoint.keep", t.checkpoint.keep),
    ):
        check(value is None or value >= 1, f"trainer.{key}={value}: must be at least 1.")
    check(
        t.resume in ("never", "auto") or Path(t.resume).is_dir(),
        f"trainer.resume={t.resume}: not never, not auto, and no such checkpoint folder.",
    )
    sched = t.lr_scheduler
    if sched.name == "wsd":
        from optimizers.schedules import wsd_decay_steps

        try:
            wsd_decay_steps(
                t.max_steps, sched.warmup_steps, sched.decay_steps, sched.decay_fraction
            )
        except ConfigError as e:
            problems.append(str(e))
    from trainers.wandb_logger import check_wandb

    wandb_problem = check_wandb(cfg.wandb)
    check(wandb_problem is None, wandb_problem or "")
    check(
        cfg.data.block_size <= cfg.model.max_position_embeddings,
        f"data.block_size={cfg.data.block_size} is longer than the model's context, "
        f"model.max_position_embeddings={cfg.model.max_position_embeddings}.",
    )
    check(cfg.data.block_size >= 2, f"data.block_size={cfg.data.block_size}: must be at least 2.")
    d = cfg.data
    check(d.packing in PACKINGS, f"data.packing={d.packing!r}: choose one of {', '.join(PACKINGS)}.")
    check(
        d.collator in COLLATORS,
        f"data.collator={d.collator!r}: known collators are {', '.join(COLLATORS)}.",
    )
    check(d.shuffle_buffer >= 0, f"data.shuffle_buffer={d.shuffle_buffer}: must be 0 (off) or more.")
    for i, source in enumerate(d.sources):
        check(source.weight > 0, f"data.sources[{i}].weight={source.weight}: must be positive.")
    check(
        tokenizer_vocab_size <= cfg.model.vocab_size,
        f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
        f"data.tokenizer={cfg.data.tokenizer!r} ({tokenizer_vocab_size}).",
    )
    if cfg.cpu_devices is not None:
        check(
            1 <= cfg.cpu_devices <= MAX_CPU_DEVICES,
            f"cpu_devices={cfg.cpu_devices}: XLA on the CPU runs 1 to {MAX_CPU_DEVICES} "
            "virtual devices.",
        )
    target = cfg.target
    check(
        target.chip is None or target.chip in TPU_HBM_GIB,
        f"target.chip={target.chip!r}: known chips are {', '.join(TPU_HBM_GIB)}.",
    )
    check(
        target.num_devices is None or target.num_devices >= 1,
        f"target.num_devices={target.num_devices}: must be at least 1.",
    )
    check(
        target.hbm_gib is None or target.hbm_gib > 0,
        f"target.hbm_gib={target.hbm_gib}: must be positive.",
    )
    p = cfg.profile
    check(
        p.start_step is None or 1 <= p.start_step <= t.max_steps,
        f"profile.start_step={p.start_step}: must be a step of the run, 1 to {t.max_steps}.",
    )
    check(p.num_steps >= 1, f"profile.num_steps={p.num_steps}: must be at least 1.")
    check(cfg.dry_run_steps >= 2, f"dry_run_steps={cfg.dry_run_steps}: must be at least 2.")
    check(
        1 <= cfg.dry_run_devices <= MAX_CPU_DEVICES,
        f"dry_run_devices={cfg.dry_run_devices}: XLA on the CPU runs 1 to {MAX_CPU_DEVICES} "
        "virtual devices.",
    )
    try:
        cfg.model.validate()
    except ConfigError as e:
        problems.append(str(e))
    return problems
