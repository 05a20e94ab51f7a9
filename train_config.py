"""The schema of a run's config.

Hydra composes configs/default.yaml on top of `TrainConfig` (registered as `schema`), so an
unknown key, a value of the wrong type or a choice that does not exist fails at start-up with
the key's name. Each block then says what is wrong with its own values (`problems`);
`TrainConfig.problems` gathers them with the checks across blocks that need no model, mesh or
device. Everything else is checked by the run's pre-flight (run/preflight.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from data.config import DataConfig
from models.llama import LlamaConfig
from torchprime.backend import BackendName
from torchprime.chips import ChipName
from torchprime.dtypes import DType
from torchprime.errors import Problems
from torchprime.mesh import MeshAxesConfig
from torchprime.precision import Precision, PrecisionConfig, resolve
from trainers.config import DebugConfig, ProfileConfig, TrainerConfig, WandbConfig
from trainers.eval_config import EvalConfig

#: torch_xla 2.9 trains on up to 64 virtual CPU devices; at 128 its autograd engine asserts.
MAX_CPU_DEVICES = 64


@dataclass
class TargetConfig:
    """The hardware a config is written for, so a machine without it can check the config
    (plan_only, dry_run) and the real run can check it landed on the right pod."""

    chip: ChipName | None = None
    """TPU generation: v4, v5e, v5p or v6e (sets the HBM per chip); null: not said."""
    num_devices: int | None = None
    """Chips of the whole pod, all slices (v5p-128 has 64 chips: one device per chip). Fills a
    -1 mesh axis in plan_only and dry_run; a TPU run on another count stops at start-up."""
    hbm_gib: float | None = None
    """HBM per chip in GiB, overriding the chip's figure (v4 32, v5e 16, v5p 95, v6e 32)."""

    def problems(self, key: str = "target") -> Problems:
        found = Problems()
        found.check(
            self.num_devices is None or self.num_devices >= 1,
            f"{key}.num_devices={self.num_devices}: must be at least 1.",
        )
        found.check(
            self.hbm_gib is None or self.hbm_gib > 0,
            f"{key}.hbm_gib={self.hbm_gib}: must be positive.",
        )
        return found


@dataclass
class TrainConfig:
    """A whole run. Groups: model (with model/sharding), data, trainer; presets: +config=NAME."""

    seed: int = 42
    """Seeds the weight init and everything random in training."""
    backend: BackendName = BackendName.auto
    """auto, xla, cpu or cuda. auto: XLA on a TPU host, CUDA when a GPU is visible, else XLA on
    virtual CPU devices when torch_xla is installed (real SPMD), else plain PyTorch on the CPU."""
    cpu_devices: int | None = None
    """Virtual devices for XLA on the CPU (CPU_NUM_DEVICES); null: as many as the mesh has.
    Ignored on TPU, where the chips are counted."""
    dtype: DType | None = None
    """Shorthand for precision.params and precision.compute both (one dtype for everything);
    null: the precision block alone. Not to be combined with those two keys."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """The dtypes of the parameters, the compute and the optimizer state."""
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
    restore and the recompile guard; ends with a one-screen report (run/dry_run.py)."""
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
    """The model: a Llama by default; a preset of another family (model=tiny_moe,
    model=mixtral_8x7b) brings that family's schema, a subclass (models.MODELS)."""
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation: the data, when, how many batches (trainers/eval_config.py)."""
    eval_only: bool = False
    """Evaluate the model of trainer.resume=CHECKPOINT (or model.pretrained_path=HF_DIR) on
    the eval batches, print the result, write output_dir/eval.json and exit: no training."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging (off by default)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """A profiler trace of a few steps (off by default)."""
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def resolved_precision(self) -> Precision:
        """The precision policy, with the `dtype` shorthand applied."""
        return resolve(self.precision, self.dtype)

    def problems(self) -> Problems:
        """Every problem the keys show, alone or between them, without a model or a device."""
        found = Problems()
        if self.cpu_devices is not None:
            found.check(
                1 <= self.cpu_devices <= MAX_CPU_DEVICES,
                f"cpu_devices={self.cpu_devices}: XLA on the CPU runs 1 to {MAX_CPU_DEVICES} "
                "virtual devices.",
            )
        found.check(
            self.dry_run_steps >= 2, f"dry_run_steps={self.dry_run_steps}: must be at least 2."
        )
        found.check(
            1 <= self.dry_run_devices <= MAX_CPU_DEVICES,
            f"dry_run_devices={self.dry_run_devices}: XLA on the CPU runs 1 to {MAX_CPU_DEVICES} "
            "virtual devices.",
        )
        found += self.ici_mesh.problems("ici_mesh", allow_fill=True)
        found += self.dcn_mesh.problems("dcn_mesh", allow_fill=False)
        found += self.target.problems()
        found += self.precision.problems()
        p = self.precision
        found.check(
            self.dtype is None or (p.params == DType.float32 and p.compute is None),
            f"dtype={self.dtype} is a shorthand for precision.params and precision.compute, "
            f"which are set too (precision.params={p.params}, precision.compute={p.compute}): "
            "give one or the other.",
        )
        found.check(
            self.trainer.optimizer.state_dtype is None,
            f"trainer.optimizer.state_dtype={self.trainer.optimizer.state_dtype} has moved: "
            f"write precision.optimizer_state={self.trainer.optimizer.state_dtype} (with "
            "precision.params and precision.compute for the other dtypes).",
        )
        found += self.model.problems()
        found += self.data.problems()
        found += self.trainer.problems()
        found += self.eval.problems()
        if self.eval_only:
            found.check(
                self.trainer.resume not in ("never", "auto") or bool(self.model.pretrained_path),
                "eval_only=true evaluates a checkpoint: give trainer.resume=CHECKPOINT_FOLDER or "
                "model.pretrained_path=HF_FOLDER.",
            )
            found.check(
                self.eval.has_data,
                "eval_only=true needs held-out data: set eval.holdout or eval.data.",
            )
        found += self.profile.problems(self.trainer.max_steps)
        found.check(
            self.data.block_size <= self.model.max_position_embeddings,
            f"data.block_size={self.data.block_size} is longer than the model's context, "
            f"model.max_position_embeddings={self.model.max_position_embeddings}.",
        )
        return found


def register_schema() -> None:
    """The schema configs/default.yaml builds on, and the resolver it names output_dir with."""
    from models import register_model_schemas
    from run.output_dir import register_output_dir_check

    ConfigStore.instance().store(name="schema", node=TrainConfig)
    register_model_schemas()
    register_output_dir_check()


def mesh_size(cfg: TrainConfig) -> int | None:
    """Devices the mesh asks for, or None when an axis is -1 (it fills the devices there are)."""
    sizes = list(vars(cfg.ici_mesh).values()) + list(vars(cfg.dcn_mesh).values())
    if -1 in sizes:
        return None
    return math.prod(sizes)
