"""Schema of the `trainer` config group (configs/trainer/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class OptimizerConfig:
    """AdamW (optimizers/adamw.py)."""

    lr: float = 3e-3
    """Peak learning rate (after warmup)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms, biases and embeddings."""
    update_clip: Optional[float] = None
    """Clamp each element of the Adam update to ±update_clip (null: off)."""
    update_rms_clip: Optional[float] = None
    """Scale each tensor's update down to RMS ≤ update_rms_clip (StableAdamW; null: off)."""
    state_dtype: Optional[str] = None
    """float32 or bfloat16 for the moment estimates; null: the parameters' dtype."""


@dataclass
class LRSchedulerConfig:
    """Learning rate over the run: linear warmup, then a decay shape."""

    name: str = "cosine"
    """constant, cosine or linear (decay from the peak to min_lr_ratio × peak at max_steps)."""
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class CheckpointConfig:
    """Distributed checkpoints under output_dir/checkpoints/step_NNNNNNNN/."""

    interval: Optional[int] = None
    """Save every `interval` steps (null: only at the end)."""
    save_at_end: bool = True
    """Save once more when training ends."""


@dataclass
class TrainerConfig:
    """The training loop: batch, steps, optimizer, schedule, clipping, logging, checkpoints."""

    name: str = "lm"
    """Trainer class in the registry (trainers.TRAINERS)."""
    max_steps: int = 300
    """Optimizer steps to run."""
    global_batch_size: int = 8
    """Rows per step over all hosts and devices; divisible by the data-parallel devices."""
    logging_steps: int = 10
    """Log metrics every this many steps (and at the last step)."""
    max_grad_norm: Optional[float] = 1.0
    """Clip gradients to this global L2 norm (null: no clipping; the norm is still logged)."""
    progress_bar: bool = True
    """Show a progress bar when the console is a terminal (else logged steps are printed)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
