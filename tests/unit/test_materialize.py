"""Meta model → initialized device model, one module at a time."""

from __future__ import annotations

import torch

from models import build_model
from models.llama import LlamaConfig
from torchprime.backend import select_backend
from torchprime.materialize import materialize
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.sharding import plan_parameter_specs


def test_materialized_weights_equal_an_in_place_init_and_ties_hold():
    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    cfg = LlamaConfig(tie_word_embeddings=True)
    model = build_model(cfg, torch.float32)
    specs = plan_parameter_specs(model, cfg.sharding, mesh)
    materialize(
        model, specs, mesh, backend, model.init_module_weights, torch.Generator().manual_seed(5)
    )

    reference = build_model(cfg, torch.float32)
    reference.to_empty(device="cpu")
    reference.tie_weights()
    reference.init_weights(torch.Generator().manual_seed(5))

    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    ref = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, ref[name]), name
