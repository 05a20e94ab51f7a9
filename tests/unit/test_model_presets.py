"""The shipped model presets compose through Hydra's schema and have the published sizes."""

from __future__ import annotations

import pytest
import torch

from conftest import composed
from models import build_model
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.sharding import plan_parameter_specs, replicated

PUBLISHED = {
    "llama3_2_1b": 1_235_814_400,
    "llama3_8b": 8_030_261_248,
    "llama3_1_8b": 8_030_261_248,
    "llama3_1_70b": 70_553_706_496,
    "llama3_1_405b": 405_853_388_800,
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_has_the_published_parameter_count(preset):
    cfg = composed(f"model={preset}")
    model = build_model(cfg.model, torch.bfloat16)  # meta device: no memory
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[preset]


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_fsdp_sharding_covers_every_matrix_of_the_preset_on_256_devices(preset):
    cfg = composed(f"model={preset}")
    model = build_model(cfg.model, torch.bfloat16)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=256), MeshAxesConfig(), 256)
    specs = plan_parameter_specs(model, cfg.model.sharding, mesh)
    assert replicated(specs) == []


def test_mixtral_8x7b_has_the_published_parameter_count():
    cfg = composed("model=mixtral_8x7b")
    model = build_model(cfg.model, torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 46_702_792_704
    experts = model.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (8, 2 * 14336, 4096)
    assert tuple(experts.down_proj.shape) == (8, 4096, 14336)
    assert tuple(model.model.layers[0].mlp.gate.weight.shape) == (8, 4096)


def test_a_tied_head_shares_the_embedding_spec():
    cfg = composed("model=llama3_2_1b")
    model = build_model(cfg.model, torch.bfloat16)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), 4)
    specs = plan_parameter_specs(model, cfg.model.sharding, mesh)
    assert specs["lm_head.weight"] == specs["model.embed_tokens.weight"] == ("fsdp", None)


def test_the_tiny_default_is_a_gqa_llama():
    cfg = composed()
    assert (cfg.model.num_attention_heads, cfg.model.num_key_value_heads) == (4, 2)
    assert cfg.model.rope_scaling is None
    scaled = composed("model=llama3_1_8b").model.rope_scaling
    assert (scaled.factor, scaled.original_max_position_embeddings) == (8.0, 8192)
