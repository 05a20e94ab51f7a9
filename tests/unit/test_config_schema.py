"""The config schema is the one source of truth: closed choices are enforced by the loader,
group files hold only what differs from the schema, each block names its own problems."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import ROOT, composed
from data.config import DataConfig
from models import MODELS
from models.llama import LlamaConfig
from torchprime.rewriting import RematConfig
from torchprime.sharding import ShardingConfig
from train_config import TrainConfig
from trainers.config import TrainerConfig

CHOICES = {
    "backend": "tpu",
    "dtype": "float16",
    "model.attention_kernel": "flashh",
    "data.packing": "zigzag",
    "data.source": "s3",
    "data.format": "csv",
    "trainer.lr_scheduler.name": "cosin",
    "precision.params": "float16",
    "precision.compute": "fp8",
    "precision.optimizer_state": "fp8",
    "wandb.mode": "live",
    "target.chip": "v7",
}


@pytest.mark.parametrize("key, value", sorted(CHOICES.items()))
def test_a_closed_choice_outside_its_options_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigCompositionException) as e:
        composed(f"{key}={value}")
    message = str(e.value.__cause__)
    assert f"Invalid value '{value}', expected one of [" in message
    assert f"full_key: {key}" in message


GROUPS = {
    "model": LlamaConfig,
    "model/remat": RematConfig,
    "model/sharding": ShardingConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
}


def flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def restated(values: dict, schema) -> list[str]:
    defaults = OmegaConf.structured(schema)
    return [
        key
        for key, value in flat(values).items()
        if OmegaConf.select(defaults, key, default="<absent>") == value
    ]


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_files_hold_only_what_differs_from_the_schema(group):
    files = sorted((ROOT / "configs" / group).glob("*.yaml"))
    assert files
    for file in files:
        values = yaml.safe_load(file.read_text()) or {}
        schema = GROUPS[group]
        defaults = values.pop("defaults", [])
        if group == "model":  # a preset of another family is checked against its own schema
            family = [n for n in MODELS if f"{n}_schema" in defaults]
            schema = MODELS[family[0]].config_class if family else schema
        assert restated(values, schema) == [], file.name


def test_default_yaml_holds_only_what_differs_from_the_schema():
    values = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    values = {k: v for k, v in values.items() if k not in ("defaults", "hydra")}
    assert restated(values, TrainConfig) == []


def test_the_check_can_tell_a_restated_default():
    assert restated({"max_steps": 300, "logging_steps": 5}, TrainerConfig) == ["max_steps"]


def test_each_block_names_its_own_problems():
    t = TrainerConfig(max_steps=0, global_batch_size=-1, max_grad_norm=0.0)
    t.optimizer.lr_multipliers = {"lm_head.weight": -1.0}
    t.lr_scheduler = dataclasses.replace(
        t.lr_scheduler, name="wsd", decay_steps=5, decay_fraction=0.5
    )
    assert t.problems() == [
        "trainer.max_steps=0: must be at least 1.",
        "trainer.global_batch_size=-1: must be at least 1.",
        "trainer.max_grad_norm=0.0: must be positive (or null).",
        "trainer.optimizer.lr_multipliers['lm_head.weight']=-1.0: must be positive.",
        "trainer.lr_scheduler.decay_steps=5 and trainer.lr_scheduler.decay_fraction=0.5: give "
        "one of them, not both.",
    ]
    cfg = TrainConfig()
    cfg.ici_mesh.fsdp, cfg.ici_mesh.tensor = -1, -1
    cfg.model.num_key_value_heads = 3
    assert cfg.problems() == [
        "ici_mesh: only one axis may be -1, got ['fsdp', 'tensor'].",
        "model.num_attention_heads=4 is not a multiple of model.num_key_value_heads=3.",
    ]
