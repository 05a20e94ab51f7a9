"""The schema of a run's config and the checks made before anything runs.

Hydra composes configs/default.yaml on top of `TrainConfig` (registered as `schema`), so an
unknown key or a value of the wrong type fails at start-up with the key's name. The checks in
`validate` then look across keys (mesh vs batch, model vs data, ...) and report every problem
at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore

from data.config import DataConfig
from models.llama import LlamaConfig
from torchprime.errors import ConfigError
from torchprime.mesh import MeshAxesConfig
from trainers.config import TrainerConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: torch_xla 2.9 trains on up to 64 virtual CPU devices; at 128 its autograd engine asserts.
MAX_CPU_DEVICES = 64


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
    run_name: str = "run"
    """Names the run (output folder, wandb). configs/default.yaml makes it the start time, so
    every run gets a new folder; name it yourself to find the run again."""
    output_dir: str = "outputs/${run_name}"
    """Where config.yaml, metrics.jsonl, checkpoints/ and the log go."""
    model: LlamaConfig = field(default_factory=LlamaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


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


def validate(cfg: TrainConfig, tokenizer_vocab_size: int) -> None:
    """Checks across keys; raises one ConfigError listing every problem found."""
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
    check(
        cfg.data.block_size <= cfg.model.max_position_embeddings,
        f"data.block_size={cfg.data.block_size} is longer than the model's context, "
        f"model.max_position_embeddings={cfg.model.max_position_embeddings}.",
    )
    check(cfg.data.block_size >= 2, f"data.block_size={cfg.data.block_size}: must be at least 2.")
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
    try:
        cfg.model.validate()
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        if len(problems) == 1:
            raise ConfigError(problems[0])
        raise ConfigError(f"{len(problems)} problems:\n  - " + "\n  - ".join(problems))
