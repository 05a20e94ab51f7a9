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
    materialize(
        model, specs, mesh, backend, model.init_module_weights, torch.Generator().manual_seed(0)
    )
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
    for _name, result in results.items():
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
    with pytest.raises(
        ConfigError, match=r"no module of class 'LlamaDecoderLayr'.*LlamaDecoderLayer"
    ):
        check_remat(model, RematConfig(activation_checkpoint_layers=["LlamaDecoderLayr"]))
    with pytest.raises(
        ConfigError, match=r"scan_layers='model.layer': no such module.*model.layers"
    ):
        check_remat(model, RematConfig(scan_layers="model.layer"))
    with pytest.raises(
        ConfigError, match=r"scan_layers='model.norm' is a RMSNorm, not a layer stack"
    ):
        check_remat(model, RematConfig(scan_layers="model.norm"))


OFFLOAD = RematConfig(
    scan_layers="model.layers",
    activation_checkpoint_layers=["LlamaDecoderLayer"],
    offload_tensors=["decoder_input", "k_proj"],
)


def test_offload_off_tpu_warns_and_keeps_numbers_or_refuses_when_strict(caplog):
    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    base = loss_and_grads(backend, mesh, RematConfig())
    with caplog.at_level("WARNING", logger="torchprime.rewriting"):
        assert_same(loss_and_grads(backend, mesh, OFFLOAD), base, 1e-6)
    assert "host offload runs on TPU only; on cpu (CPU)" in caplog.text
    strict = RematConfig(**{**vars(OFFLOAD), "offload_strict": True})
    with pytest.raises(
        ConfigError, match=r"offload_tensors=\['decoder_input', 'k_proj'\].*TPU only"
    ):
        loss_and_grads(backend, mesh, strict)


def test_offload_names_are_checked():
    model = build_model(LlamaConfig(), torch.float32)
    with pytest.raises(ConfigError, match=r"no activation 'decoder_inputs'.*decoder_input"):
        check_remat(
            model, RematConfig(scan_layers="model.layers", offload_tensors=["decoder_inputs"])
        )
    with pytest.raises(ConfigError, match="offload_tensors needs model.remat.scan_layers"):
        check_remat(model, RematConfig(offload_tensors=["decoder_input"]))


def test_offload_partition_saves_only_the_marked_activations():
    """The partition keeps the marked tensors (through the placement ops) and recomputes
    the rest, with the gradients of an ordinary backward."""
    from functorch.compile import aot_function, default_partition, make_boxed_func

    from torchprime.offload import activate, offload_partition

    model = build_model(LlamaConfig(num_hidden_layers=1), torch.float32).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=gen)
    layer = model.model.layers[0]
    x = torch.randn(2, 8, 128, generator=gen, requires_grad=True)
    cos, sin = model.model.rotary_emb(torch.arange(8).expand(2, 8), torch.float32)
    params = dict(layer.named_parameters())

    def step(x, params, cos, sin):
        return torch.func.functional_call(layer, params, (x, cos, sin)).square().sum()

    sent, fetched = [], []

    def to_host(t):
        sent.append(t.shape)
        return t.clone()

    def to_device(t):
        fetched.append(t.shape)
        return t.clone()

    saved = {}

    def keep(name):
        def compiler(gm, _):
            saved[name] = gm
            return make_boxed_func(gm)

        return compiler

    names = frozenset({"decoder_input", "k_proj"})
    activate(layer, names)
    partition = offload_partition(names, to_host, to_device)
    loss = aot_function(step, keep("fwd"), keep("bwd"), partition_fn=partition)(x, params, cos, sin)
    grads = torch.autograd.grad(loss, [x, *params.values()])
    aot_function(step, keep("fwd_d"), keep("bwd_d"), partition_fn=default_partition)(
        x, params, cos, sin
    )
    activate(layer, frozenset())
    ref = step(x, params, cos, sin)
    ref_grads = torch.autograd.grad(ref, [x, *params.values()])
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert sorted(sent) == sorted(fetched) == sorted([(2, 8, 128), (2, 8, 64)])

    def activations(gm):  # forward outputs that are not the loss, primals or weights
        outs = next(n for n in gm.graph.nodes if n.op == "output").args[0][1:]
        return [n for n in outs if n.op != "placeholder"]

    assert len(activations(saved["fwd"])) == 2  # the two marked tensors, nothing else
    assert len(activations(saved["fwd_d"])) > 6  # the plain partition keeps many more


@requires_xla
def test_xla_offload_puts_the_marked_activations_on_the_host(monkeypatch):
    """Host memory only exists on TPU: here the scan's graph is checked for the placements
    (it cannot compile on CPU), and the same partition with device placements for numbers."""
    import gc

    from torchprime.backend.xla import XlaBackend
    from torchprime.offload import offload_partition

    backend = select_backend("xla", cpu_devices=4)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), 4)
    base = loss_and_grads(backend, mesh, RematConfig())
    monkeypatch.setattr(XlaBackend, "supports_host_offload", True)
    same_device = torch.ops.aten.clone.default
    with monkeypatch.context() as m:
        m.setattr(
            XlaBackend,
            "offload_partition",
            lambda self, n: offload_partition(n, same_device, same_device),
        )
        assert_same(loss_and_grads(backend, mesh, OFFLOAD), base, 1e-5)

    cfg = LlamaConfig(num_hidden_layers=2, sharding=ShardingConfig(parameters=FSDP))
    model = build_model(cfg, torch.float32)
    specs = plan_parameter_specs(model, cfg.sharding, mesh)
    materialize(
        model, specs, mesh, backend, model.init_module_weights, torch.Generator().manual_seed(0)
    )
    apply_rewriting(model, OFFLOAD, backend)
    ids = torch.zeros(4, 16, dtype=torch.long).to(backend.device)
    loss = model(ids, labels=ids).loss
    loss.backward()
    text = backend.graph_text([loss, *(p.grad for p in model.parameters())])
    placements = [line for line in text.splitlines() if "annotate_device_placement" in line]
    to_host = [line for line in placements if "pinned_host" in line]
    assert len(to_host) == 2 and len(placements) == 4, placements  # 2 names, out and back
    # drop the graph: a CPU runtime cannot compile it, and the next sync would try
    del model, loss, text
    gc.collect()
    apply_rewriting(
        build_model(LlamaConfig(num_hidden_layers=1), torch.float32), RematConfig(), backend
    )
    backend.sync()
