"""Where the compared weights come from: the seeded init of the config, an HF Llama folder, or a
run's checkpoint. Both sides read the same weights, as the HF folder interop reads them.

`init` needs no file for our model (the init is drawn on the host from the seed, the same
numbers on every backend and mesh); transformers' model reads a folder, so the init is written
as one first. A checkpoint is read once on the host and written as an HF folder in float32, which
every side then loads (bfloat16 values convert to float32 exactly).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models import build_model
from models.hf import CONFIG_FILE, save_hf
from torchprime.backend.eager import EagerBackend
from torchprime.errors import ConfigError
from train_config import TrainConfig
from trainers.checkpoint import CorruptCheckpoint, is_complete, load_checkpoint, step_dirs

log = logging.getLogger(__name__)

INIT = "init"


def kind_of(source: str) -> str:
    """ "init", "hf" (a folder with config.json) or "checkpoint" (a step folder, or a run's
    output_dir with checkpoints/); a ConfigError naming `source` otherwise."""
    if source == INIT:
        return INIT
    path = Path(source)
    if (path / CONFIG_FILE).is_file():
        return "hf"
    if (path / ".metadata").is_file() or (path / "checkpoints").is_dir():
        return "checkpoint"
    raise ConfigError(
        f"--weights {source}: neither `init`, an HF folder (with {CONFIG_FILE}), a checkpoint "
        "(output_dir/checkpoints/step_N) nor a run's output_dir (with checkpoints/)."
    )


def checkpoint_step_dir(source: str) -> Path:
    """The step folder `source` names, or the newest complete one of a run's output_dir."""
    path = Path(source)
    if (path / ".metadata").is_file():
        return path
    complete = [p for p in step_dirs(path / "checkpoints") if is_complete(p)]
    if not complete:
        raise ConfigError(f"--weights {source}: no complete checkpoint under checkpoints/.")
    return complete[0]


def write_hf_folder(source: str, cfg: TrainConfig, folder: Path) -> Path:
    """The weights of `source` ("init" or a checkpoint) for the model of `cfg`, written to
    `folder` as an HF Llama folder in float32; returns `folder`."""
    model = build_model(cfg.model, torch.float32)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(torch.Generator().manual_seed(cfg.seed))  # also the RoPE buffers
    if kind_of(source) == "checkpoint":
        step = checkpoint_step_dir(source)
        state = {"model": model.state_dict(keep_vars=True)}
        try:
            load_checkpoint(step, state, EagerBackend("cpu"))
        except CorruptCheckpoint as e:
            raise ConfigError(
                f"--weights {step}: cannot load it into model={cfg.model.name} as configured "
                f"({e}); give the run's model keys (see its config.yaml) before --a/--b."
            ) from None
        log.info("weights: checkpoint %s", step)
    save_hf(model, folder, dtype=torch.float32)
    return folder
