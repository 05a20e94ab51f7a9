"""Scan, remat and optimization barriers change how the step is compiled, never its numbers."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_xla
from models import build_model
from models.llama import LlamaConfig
from torchprime.backend import select_backend
from torchprime.errors import ConfigError
from torchprime.materialize import materialize
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.rewriting import RematConfig, apply_rewriting, check_remat
from torchprime.sharding import ShardingConfig, plan_parameter_specs

FSDP = {
    "model.embed_tokens.weight": ["fsdp", None],
    "model.layers.*.self_attn.q_proj.weight": ["fsdp", None],
    "model.layers.*.mlp.up_proj.weight": ["fsdp", None],
    "model.layers.*.mlp.down_proj.weight": [None, "fsdp"],
    "lm_head.weight": ["fsdp", None],
}
VARIANTS = {
    "scan": RematConfig(scan_layers="model.layers"),
    "scan_remat": RematConfig(
        scan_layers="model.layers", activation_checkpoint_layers=["LlamaDecoderLayer"]
    ),
    "layer_remat": RematConfig(activation_checkpoint_layers=["LlamaDecoderLayer"]),
    "mlp_remat_in_scan": RematConfig(
        scan_layers="model.layers", activation_checkpoint_layers=["LlamaMLP"]
    ),
    "barriers": RematConfig(
        activation_checkpoint_layers=["LlamaDecoderLayer"],
        optimization_barrier_layers=["LlamaDecoderLayer"],
    ),
    "scan_remat_barriers": RematConfig(
        scan_layers="model.layers",
        activation_checkpoint_layers=["LlamaDecoderLayer"],
        optimization_barrier_layers=["LlamaDecoderLayer"],
    ),
}
XLA_VARIANTS = {k: v for k, v in VARIANTS.items() if k != "mlp_remat_in_scan"}


def loss_and_grads(backend, mesh, remat: RematConfig):
    cfg = LlamaConfig(
        num_hidden_layers=2, sharding=ShardingConfig(parameters=FSDP if backend.is_xla else {})
    )
    model = build_model(cfg, torch.float32)
    specs = plan_parameter_specs(model, cfg.sharding, mesh)
    materialize(model, specs, mesh, backend, model.init_module_weights, torch.Generator().manual_seed(0))
    apply_rewriting(model, remat, backend)
    ids = torch.randint(0, 264, (4, 16), generator=torch.Generator().manual_seed(1))
    ids = ids.to(backend.device)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    text = backend.graph_text([loss, *grads.values()])
    backend.sync()
    return loss.detach().cpu(), {n: g.cpu() for n, g in grads.items()}, text


def assert_same(a, b, tol):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_eager_rewriting_keeps_loss_and_gradients(variant):
    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    base = loss_and_grads(backend, mesh, RematConfig())
    assert_same(loss_and_grads(backend, mesh, VARIANTS[variant]), base, 1e-6)


@requires_xla
def test_xla_rewriting_keeps_loss_and_gradients_and_shows_in_the_graph():
    backend = select_backend("xla", cpu_devices=4)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), 4)
    base = loss_and_grads(backend, mesh, RematConfig())
    assert "opt-barrier" not in base[2] and " while(" not in base[2]
    results = {name: loss_and_grads(backend, mesh, remat) for name, remat in XLA_VARIANTS.items()}
    for name, result in results.items():
        assert_same(result, base, 1e-5)
    assert " while(" in results["scan"][2]  # the layers run as one loop
    assert "opt-barrier" in results["barriers"][2]
    # checkpointing on XLA keeps its recomputation apart with barriers too
    assert "opt-barrier" in results["layer_remat"][2]
    # a part of a scanned layer cannot be checkpointed on XLA: said before anything runs
    with pytest.raises(ConfigError, match="LlamaMLP sits inside the scanned model.layers"):
        loss_and_grads(backend, mesh, VARIANTS["mlp_remat_in_scan"])


def test_names_that_match_nothing_list_the_closest():
    model = build_model(LlamaConfig(), torch.float32)
    with pytest.raises(ConfigError, match=r"no module of class 'LlamaDecoderLayr'.*LlamaDecoderLayer"):
        check_remat(model, RematConfig(activation_checkpoint_layers=["LlamaDecoderLayr"]))
    with pytest.raises(ConfigError, match=r"scan_layers='model.layer': no such module.*model.layers"):
        check_remat(model, RematConfig(scan_layers="model.layer"))
    with pytest.raises(ConfigError, match=r"scan_layers='model.norm' is a RMSNorm, not a layer stack"):
        check_remat(model, RematConfig(scan_layers="model.norm"))
