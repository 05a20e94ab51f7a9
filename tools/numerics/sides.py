"""A side of a numerics comparison: which model, on which backend and mesh, in which dtype.

A side is written as Hydra overrides of the training config, as on train.py's command line
(`backend=xla ici_mesh.fsdp=4 dtype=bfloat16`), on top of the overrides both sides share.
A first word `hf` makes the side transformers' `LlamaForCausalLM` instead of ours, on the CPU,
built from the same weights through the HF folder interop (models/hf.py); its dtype and
attention (`dtype`, `model.attention_kernel` eager or sdpa) come from the same keys.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from models.hf import ARCHITECTURE_FIELDS
from torchprime.errors import ConfigError
from torchprime.mesh import Mesh, MeshAxesConfig, resolve_mesh
from torchprime.sharding import BATCH_SPEC
from train_config import TrainConfig, register_schema

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
HF = "hf"

#: Keys besides the architecture that decide the weights of a seeded init.
INIT_FIELDS = ("initializer_range", "scale_output_init")


@dataclass
class Side:
    """One side, its config composed."""

    label: str
    """"a" (the reference) or "b"."""
    text: str
    """As the user wrote it."""
    overrides: list[str]
    """The Hydra overrides it is composed from: the shared ones, then its own."""
    hf: bool
    """transformers' LlamaForCausalLM rather than ours."""
    cfg: TrainConfig

    def describe(self) -> str:
        what = "transformers LlamaForCausalLM" if self.hf else "ours"
        return f"{self.label}: {self.text or '(defaults)'} [{what}, {self.cfg.dtype}]"


def parse_side(label: str, text: str, shared: list[str] = ()) -> Side:
    """The side `text` means, its config composed on top of the `shared` overrides; a
    ConfigError naming the side for anything Hydra or the schema refuses."""
    words = shlex.split(text)
    hf = bool(words) and words[0] == HF
    overrides = [*shared, *words[hf:]]
    try:
        cfg = compose_config(overrides)
    except ConfigError as e:
        raise ConfigError(f"side {label} ({text!r}): {e}") from None
    if hf:
        if cfg.backend not in ("auto", "cpu"):
            raise ConfigError(
                f"side {label}: backend={cfg.backend} with hf; transformers' model runs on the "
                "CPU here (leave backend out, or compare it with our model on that backend)."
            )
        if cfg.model.attention_kernel not in ("eager", "sdpa"):
            raise ConfigError(
                f"side {label}: model.attention_kernel={cfg.model.attention_kernel} with hf; "
                "transformers' attention is eager or sdpa."
            )
    return Side(label, text, overrides, hf, cfg)


def compose_config(overrides: list[str]) -> TrainConfig:
    """The run config Hydra composes from configs/ with `overrides`, as train.py would."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
            return OmegaConf.to_object(compose("default", overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None


def differences(a: Side, b: Side, seeded_init: bool) -> list[str]:
    """What the two sides' models disagree on: their architecture and, when both draw the
    seeded init, what decides it. One line each, naming the key and both values."""
    keys = [f"model.{name}" for name in ARCHITECTURE_FIELDS]
    keys.append("model.pretrained_path")
    if seeded_init:
        keys += ["seed", *(f"model.{name}" for name in INIT_FIELDS)]
    found = []
    for key in keys:
        va, vb = _value(a.cfg, key), _value(b.cfg, key)
        if va != vb:
            found.append(f"{key.replace('resolved_', '')}: a={va!r}, b={vb!r}")
    return found


def check_same_model(a: Side, b: Side, seeded_init: bool) -> None:
    """ConfigError listing every difference: a comparison of two different models would
    show errors that no backend, mesh or dtype caused."""
    found = differences(a, b, seeded_init)
    if found:
        raise ConfigError(
            "the two sides are different models, so their numbers cannot be compared: "
            + "; ".join(found)
            + ". Give these keys once, before --a/--b, so both sides share them."
        )


def _value(cfg: TrainConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def side_mesh(side: Side) -> Mesh:
    """The mesh the side's config asks for (one device for the hf side)."""
    if side.hf:
        return resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    return resolve_mesh(side.cfg.ici_mesh, side.cfg.dcn_mesh, None)


def check_batch_fits(side: Side, rows: int) -> None:
    """The batch's rows split evenly over the side's data-parallel devices."""
    mesh = side_mesh(side)
    ways = mesh.size(BATCH_SPEC[0])
    if rows < 1 or rows % ways:
        raise ConfigError(
            f"--batch-size={rows} does not split over the {ways} data-parallel devices "
            f"(data x fsdp) of side {side.label}'s mesh {mesh.describe()}: use a multiple of "
            f"{ways}."
        )


def check_seq_len(side: Side, seq_len: int) -> None:
    limit = side.cfg.model.max_position_embeddings
    if not 2 <= seq_len <= limit:
        raise ConfigError(
            f"--seq-lens {seq_len}: a sequence is 2 to model.max_position_embeddings={limit} "
            "tokens long."
        )
