"""Schema of the `trainer` config group (configs/trainer/) and of the `wandb`, `profile` and
`debug` blocks. Each block says what is wrong with its own values (`problems`); checks that
need a model, a mesh or devices are made by the run's pre-flight (run/preflight.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from optimizers.schedules import ScheduleName, wsd_decay_steps
from torchprime.dtypes import DType
from torchprime.errors import Problems
from trainers.spike import SpikeConfig


def _at_least(found: Problems, key: str, value: float | None, low: float, null: bool) -> None:
    ok = (value is None and null) or (value is not None and value >= low)
    found.check(ok, f"{key}={value}: must be at least {low:g}{' (or null)' if null else ''}.")


def _positive(found: Problems, key: str, value: float | None) -> None:
    found.check(value is None or value > 0, f"{key}={value}: must be positive (or null).")


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
    update_clip: float | None = None
    """Clamp each element of the Adam update to ±update_clip (null: off)."""
    update_rms_clip: float | None = None
    """Scale each tensor's update down to RMS ≤ update_rms_clip (StableAdamW; null: off)."""
    state_dtype: DType | None = None
    """Moved to precision.optimizer_state: set here, the run stops saying so."""
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Parameter name pattern (`*` is one name component, as in model.sharding) → factor on
    the scheduled lr, e.g. {lm_head.weight: 0.5}. A pattern matching nothing is an error."""

    def problems(self, key: str = "trainer.optimizer") -> Problems:
        found = Problems()
        found.check(self.lr > 0, f"{key}.lr={self.lr}: must be positive.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            found.check(0 <= value < 1, f"{key}.{name}={value}: must be in [0, 1).")
        found.check(self.eps > 0, f"{key}.eps={self.eps}: must be positive.")
        found.check(
            self.weight_decay >= 0, f"{key}.weight_decay={self.weight_decay}: must be 0 or more."
        )
        _positive(found, f"{key}.update_clip", self.update_clip)
        _positive(found, f"{key}.update_rms_clip", self.update_rms_clip)
        for pattern, factor in self.lr_multipliers.items():
            found.check(
                factor > 0, f"{key}.lr_multipliers[{pattern!r}]={factor}: must be positive."
            )
        return found


@dataclass
class LRSchedulerConfig:
    """Learning rate over the run: linear warmup, then a decay shape."""

    name: ScheduleName = ScheduleName.cosine
    """constant; cosine or linear (decay from the peak to min_lr_ratio × peak at max_steps);
    wsd (warmup-stable-decay: the peak, then a linear decay over the last decay_steps)."""
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    """wsd: steps of the final decay. Give this or decay_fraction (neither: 0.1 of max_steps)."""
    decay_fraction: float | None = None
    """wsd: the final decay as a fraction of max_steps."""

    def problems(self, max_steps: int, key: str = "trainer.lr_scheduler") -> Problems:
        found = Problems()
        _at_least(found, f"{key}.warmup_steps", self.warmup_steps, 0, null=False)
        found.check(
            0 <= self.min_lr_ratio <= 1,
            f"{key}.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1].",
        )
        if self.name == ScheduleName.wsd:
            found.attempt(
                wsd_decay_steps, max_steps, self.warmup_steps, self.decay_steps, self.decay_fraction
            )
        return found


@dataclass
class CheckpointConfig:
    """Distributed checkpoints under output_dir/checkpoints/step_NNNNNNNN/."""

    interval: int | None = None
    """Save every `interval` steps (null: only at the end)."""
    save_at_end: bool = True
    """Save once more when training ends."""
    keep: int | None = 3
    """Keep the newest `keep` complete checkpoints, deleting older ones (null: keep all)."""
    async_save: bool = False
    """Write checkpoints in the background while training goes on (trainers/async_checkpoint.py:
    the state is staged in host memory, COMPLETE written once the write finished, one save in
    flight; with several processes each writes its shards, coordinated through a gloo group of
    their own). Off by default until a
    write in flight is proven against the fault-injection suite (a checkpoints folder deleted
    between saves still leaves a background write's folder behind)."""

    def problems(self, key: str = "trainer.checkpoint") -> Problems:
        found = Problems()
        _at_least(found, f"{key}.interval", self.interval, 1, null=True)
        _at_least(found, f"{key}.keep", self.keep, 1, null=True)
        return found


@dataclass
class TrainerConfig:
    """The training loop: batch, steps, optimizer, schedule, clipping, logging, checkpoints."""

    name: str = "lm"
    """Trainer class in the registry (trainers.TRAINERS)."""
    max_steps: int = 300
    """Optimizer steps to run; the lr schedule spans them."""
    global_batch_size: int = 8
    """Rows per optimizer step over all hosts, devices and accumulated micro-batches;
    divisible by grad_accum_steps × the data-parallel devices."""
    grad_accum_steps: int = 1
    """Micro-batches of global_batch_size / grad_accum_steps rows summed into one step (the
    loss is normalized by the real tokens of all of them: the same step as one big batch)."""
    logging_steps: int = 10
    """Log metrics every this many steps (and at the first and last step)."""
    max_grad_norm: float | None = 1.0
    """Clip gradients to this global L2 norm (null: no clipping; the norm is still logged)."""
    max_grad_value: float | None = None
    """Clamp each gradient element to ±max_grad_value, before norm clipping (null: off)."""
    max_consecutive_skips: int | None = 10
    """Stop the run when this many steps in a row had non-finite gradients or were loss
    spikes (trainer.spike; each is skipped: nothing changes). Checked at logged steps. null:
    never stop."""
    peak_flops_per_device: float | None = None
    """Peak FLOP/s of one device for the logged mfu; null: from the table of known TPUs (no
    mfu elsewhere, e.g. on CPU)."""
    progress_bar: bool = True
    """Show a progress bar when the console is a terminal (else logged steps are printed)."""
    resume: str = "never"
    """never: refuse an output_dir that holds a run; auto: continue the run in output_dir from
    its newest complete checkpoint (or from step 0 when it has none); or a checkpoint folder."""
    recompile_warmup_steps: int = 2
    """Steps allowed to compile (the step graph, then with the optimizer state); after them,
    every new XLA compilation is reported with the step and its cause."""
    fail_on_recompile: bool = False
    """Stop the run (exit 1) at a compilation after warm-up instead of warning."""
    stop_at_step: int | None = None
    """Stop once this step is done, as a preemption would (save, exit 0), without changing the
    schedule, which still spans max_steps; resume with trainer.resume=auto. null: run on."""
    export_hf: bool = False
    """At the end, also write the model as an HF Llama folder to output_dir/hf (single host)."""
    compile: bool = False
    """Compile the loss computation (the model's forward, and through it the backward) with
    torch.compile on the eager backends (cpu, cuda): the first step takes longer (tens of
    seconds), later steps are faster. Parameter names, checkpoints and the HF export are those
    of the uncompiled model. On XLA it is ignored, with a note at start-up: XLA compiles the
    whole step already, so one config runs on every backend."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    """Loss-spike skipping (trainers/spike.py)."""

    def problems(self, key: str = "trainer") -> Problems:
        found = Problems()
        for name in ("max_steps", "logging_steps", "global_batch_size", "grad_accum_steps"):
            _at_least(found, f"{key}.{name}", getattr(self, name), 1, null=False)
        for name in ("max_consecutive_skips", "stop_at_step"):
            _at_least(found, f"{key}.{name}", getattr(self, name), 1, null=True)
        _at_least(found, f"{key}.recompile_warmup_steps", self.recompile_warmup_steps, 0, False)
        for name in ("max_grad_norm", "max_grad_value", "peak_flops_per_device"):
            _positive(found, f"{key}.{name}", getattr(self, name))
        found.check(
            self.resume in ("never", "auto") or Path(self.resume).is_dir(),
            f"{key}.resume={self.resume}: not never, not auto, and no such checkpoint folder.",
        )
        found += self.optimizer.problems(f"{key}.optimizer")
        found += self.lr_scheduler.problems(self.max_steps, f"{key}.lr_scheduler")
        found += self.checkpoint.problems(f"{key}.checkpoint")
        found += self.spike.problems(f"{key}.spike")
        return found


class WandbMode(StrEnum):
    offline = "offline"
    """Files under `dir`; `wandb sync` uploads them later."""
    online = "online"
    disabled = "disabled"


@dataclass
class WandbConfig:
    """Weights & Biases logging of the metrics and the resolved config (process 0 only)."""

    enabled: bool = False
    mode: WandbMode = WandbMode.offline
    """offline (written under `dir`, `wandb sync` uploads it later), online or disabled."""
    project: str = "torchprime"
    entity: str | None = None
    """Team or user; null: wandb's default for the logged-in user."""
    run_name: str | None = None
    """Name shown in wandb; null: the run's run_name."""
    tags: list[str] = field(default_factory=list)
    dir: str | None = None
    """Where wandb writes its files (a wandb/ folder inside); null: output_dir."""


@dataclass
class ProfileConfig:
    """A trace of a few training steps: torch_xla's profiler on XLA (open the folder in
    TensorBoard's profile plugin or XProf), the PyTorch profiler elsewhere (a Chrome trace,
    chrome://tracing or Perfetto)."""

    start_step: int | None = None
    """First traced step; null: no trace. Past warm-up (3 or later), the trace shows steady
    steps rather than compilation."""
    num_steps: int = 3
    """Steps in the trace."""
    dir: str | None = None
    """Where the trace goes; null: output_dir/profile."""

    def problems(self, max_steps: int, key: str = "profile") -> Problems:
        found = Problems()
        found.check(
            self.start_step is None or 1 <= self.start_step <= max_steps,
            f"{key}.start_step={self.start_step}: must be a step of the run, 1 to {max_steps}.",
        )
        _at_least(found, f"{key}.num_steps", self.num_steps, 1, null=False)
        return found


@dataclass
class DebugConfig:
    """What a run writes to debug the compiled program."""

    dump_hlo: bool = False
    """XLA: write the training step's graph as traced, with its sharding annotations, for the
    steps that compile (output_dir/hlo/step_NNNNNNNN.hlo.txt), and have XLA dump every module it
    compiles before and after optimization: the *after_optimizations* files are the per-device
    program after SPMD partitioning (output_dir/hlo/xla/)."""
