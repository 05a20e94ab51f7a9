"""The Mixtral model: routing implementations agree where they should, capacity drops what it
must and counts it, the router losses are transformers', the registry picks the schema."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hydra.errors import ConfigCompositionException
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from conftest import composed, requires_xla
from models import build_model
from models.generation import KVCache, forward_cached
from models.mixtral import MixtralConfig, MixtralForCausalLM
from models.moe import MixtralSparseMoeBlock, expert_capacity
from torchprime.backend import select_backend
from torchprime.errors import ConfigError
from torchprime.materialize import materialize
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.rewriting import RematConfig, apply_rewriting
from torchprime.sharding import BATCH_SPEC, plan_parameter_specs
from trainers.metrics import model_flops_per_token

TINY = dict(intermediate_size=96, num_hidden_layers=2)


def make(seed: int = 0, **overrides) -> MixtralForCausalLM:
    model = build_model(MixtralConfig(**{**TINY, **overrides}), torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def same_weights(model: MixtralForCausalLM, **overrides) -> MixtralForCausalLM:
    other = make(**{**dataclasses.asdict(model.config), **overrides})
    other.load_state_dict(model.state_dict())
    return other


def tokens(batch=2, length=24, seed=1):
    return torch.randint(0, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


def routing(block: MixtralSparseMoeBlock, x: torch.Tensor):
    """The block's own choice of experts for x [B, T, H]: ([N, k] weights, [N, k] experts)."""
    probs = torch.softmax(block.gate(x.reshape(-1, x.shape[-1])).float(), dim=-1)
    w, e = torch.topk(probs, block.top_k, dim=-1)
    return w / w.sum(-1, keepdim=True), e


def test_dropless_static_and_ample_capacity_give_the_same_logits():
    model, ids = make(), tokens()
    reference = model(ids).logits
    roomy = same_weights(model, moe_implementation="capacity", capacity_factor=2.0)
    # capacity 2 x (N k / E) = N: no expert can overflow.
    assert (roomy(ids).logits - reference).abs().max() < 1e-5
    for block in model.modules():
        if isinstance(block, MixtralSparseMoeBlock):
            block.static_shapes = True  # every expert on every token
    assert (model(ids).logits - reference).abs().max() < 1e-5


def test_capacity_drops_the_overflow_first_choices_first_and_counts_it():
    model = make(moe_implementation="capacity", capacity_factor=0.5)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(3))
    out, stats = block(x)
    weights, chosen = routing(block, x)
    N, k, E = 48, 2, 4
    C = expert_capacity(N, k, E, 0.5)
    assert C == 12
    # Reference: assignments in priority order (all first choices, then the second ones),
    # each expert keeping its first C.
    expected = torch.zeros(N, 128)
    taken = [0] * E
    dropped = 0
    flat = x.reshape(N, 128)
    for slot in range(k):
        for n in range(N):
            e = int(chosen[n, slot])
            if taken[e] == C:
                dropped += 1
                continue
            taken[e] += 1
            expected[n] += weights[n, slot] * block.experts.one(e, flat[n : n + 1])[0]
    assert dropped > 0
    assert stats[2 * E + 1].item() == dropped
    assert (out.reshape(N, 128) - expected).abs().max() < 1e-5


def test_aux_loss_is_transformers_load_balancing_loss_and_joins_the_loss():
    model, ids = make(router_aux_loss_coef=0.1, router_z_loss_coef=0.01), tokens()
    logits = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, a, out: logits.append(out))
        for layer in model.model.layers
    ]
    out = model(ids, labels=ids)
    for h in hooks:
        h.remove()
    hf_aux = load_balancing_loss_func(tuple(logits), num_experts=4, top_k=2)
    assert abs(out.metrics["aux_loss"].item() - hf_aux.item()) < 1e-6
    z = torch.stack([torch.logsumexp(lg, -1).pow(2).mean() for lg in logits]).mean()
    assert abs(out.metrics["z_loss"].item() - z.item()) < 1e-5
    plain = same_weights(model, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    ce = plain(ids, labels=ids).loss
    assert abs(out.loss.item() - (ce + 0.1 * hf_aux + 0.01 * z).item()) < 1e-5
    # The load: each expert's top-k assignments over an even share, over both layers.
    counts = torch.bincount(torch.cat([lg.topk(2, -1).indices.flatten() for lg in logits]), None, 4)
    load = counts.float() * 4 / (2 * 48 * 2)
    assert math.isclose(out.metrics["max_expert_load"].item(), load.max().item(), rel_tol=1e-6)
    assert math.isclose(out.metrics["min_expert_load"].item(), load.min().item(), rel_tol=1e-6)
    assert out.metrics["dropped_fraction"].item() == 0.0


def test_the_aux_loss_trains_the_router():
    model, ids = make(router_aux_loss_coef=1.0), tokens()
    model(ids, labels=ids).loss.backward()
    with_aux = model.model.layers[0].mlp.gate.weight.grad.clone()
    plain = same_weights(model, router_aux_loss_coef=0.0)
    plain(ids, labels=ids).loss.backward()
    assert (with_aux - plain.model.layers[0].mlp.gate.weight.grad).abs().max() > 1e-4


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(num_experts_per_tok=5), "model.num_experts_per_tok=5: must be between 1 and "),
        (dict(capacity_factor=0.0), "model.capacity_factor=0.0: must be positive."),
        (dict(num_local_experts=0), "model.num_local_experts=0: must be at least 1."),
        (dict(router_aux_loss_coef=-1.0), "model.router_aux_loss_coef=-1.0: must be at least 0"),
        (dict(sliding_window=4096), "model.sliding_window=4096: sliding-window attention"),
    ],
)
def test_bad_moe_keys_are_named(overrides, needle):
    problems = MixtralConfig(**overrides).problems()
    assert any(needle in p for p in problems), problems
    with pytest.raises(ConfigError, match="model."):
        make(**overrides)


def test_the_preset_picks_the_family_schema_and_its_keys():
    cfg = composed("model=tiny_moe", "model.num_local_experts=8")
    assert type(cfg.model) is MixtralConfig and cfg.model.num_local_experts == 8
    assert cfg.model.moe_implementation == "capacity"
    assert type(build_model(cfg.model, torch.float32)) is MixtralForCausalLM
    with pytest.raises(ConfigCompositionException) as e:
        composed("model=tiny_moe", "model.num_local_expertz=8")
    assert "full_key: model.num_local_expertz" in str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException) as e:  # a Mixtral key on a Llama
        composed("model.num_local_experts=8")
    assert "full_key: model.num_local_experts" in str(e.value.__cause__)
    wrong = composed("model.name=mixtral").model
    assert wrong.problems() == [
        "model.name='mixtral' does not match the model preset's schema (LlamaConfig, name "
        "'llama'): choose the family with a preset, model=PRESET (configs/model/), which sets "
        "both."
    ]


def loss_grads_metrics(backend, mesh, remat: RematConfig, seed: int = 1, **overrides):
    """One forward and backward of a materialized, rewritten tiny Mixtral on `backend`."""
    cfg = MixtralConfig(**{**TINY, **overrides})
    model = build_model(cfg, torch.float32)
    specs = plan_parameter_specs(model, cfg.sharding, mesh)
    init = model.init_module_weights
    materialize(model, specs, mesh, backend, init, torch.Generator().manual_seed(0))
    apply_rewriting(model, remat, backend)
    return model, run_once(model, backend, mesh, seed)


def run_once(model, backend, mesh, seed):
    ids = backend.place(tokens(4, 16, seed), mesh, BATCH_SPEC)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    text = backend.graph_text([out.loss, *grads.values()])
    backend.sync()
    model.zero_grad(set_to_none=True)
    metrics = {k: v.item() for k, v in out.metrics.items()}
    return out.loss.item(), {n: g.cpu() for n, g in grads.items()}, metrics, text


def assert_same(a, b, tol):
    assert abs(a[0] - b[0]) < tol
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)
    for name in a[2]:
        assert abs(a[2][name] - b[2][name]) < tol, name


SCAN_REMAT = RematConfig(
    scan_layers="model.layers", activation_checkpoint_layers=["LlamaDecoderLayer"]
)


@pytest.mark.parametrize(
    "remat",
    [
        RematConfig(scan_layers="model.layers"),
        SCAN_REMAT,
        RematConfig(
            activation_checkpoint_layers=["MixtralDecoderLayer"],
            optimization_barrier_layers=["MixtralDecoderLayer"],
        ),
    ],
)
def test_eager_scan_and_remat_keep_the_loss_gradients_and_router_metrics(remat):
    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    moe = dict(moe_implementation="capacity", capacity_factor=1.0)
    _, base = loss_grads_metrics(backend, mesh, RematConfig(), **moe)
    assert base[2]["dropped_fraction"] > 0
    _, rewritten = loss_grads_metrics(backend, mesh, remat, **moe)
    assert_same(rewritten, base, 1e-6)


@requires_xla
def test_xla_both_routings_compile_once_and_scan_keeps_the_numbers():
    """On 4 virtual devices: capacity (unrolled, and scanned with remat) and dropless give
    eager's loss, gradients and router metrics, and a third batch compiles nothing new."""
    eager = select_backend("cpu", cpu_devices=1)
    one = resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    xla = select_backend("xla", cpu_devices=4)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), 4)
    cases = {
        "capacity": (RematConfig(), dict(moe_implementation="capacity", capacity_factor=1.0)),
        "capacity_scan": (SCAN_REMAT, dict(moe_implementation="capacity", capacity_factor=1.0)),
        "dropless": (RematConfig(), dict(moe_implementation="dropless")),
    }
    for name, (remat, moe) in cases.items():
        _, reference = loss_grads_metrics(eager, one, RematConfig(), **moe)
        model, first = loss_grads_metrics(xla, mesh, remat, **moe)
        assert_same(first, reference, 1e-5)
        run_once(model, xla, mesh, 2)  # a scan traces its layer again once (warm-up)
        compiled = xla.compile_count()
        run_once(model, xla, mesh, 3)
        assert xla.compile_count() == compiled, name
        if name == "capacity_scan":
            assert " while(" in first[3]  # the layers run as one loop


def test_model_flops_count_the_active_experts_only():
    """The tiny MoE (4 experts of width 256, 2 a token) does the work of a Llama of width 512
    plus its router: MFU is computed from the experts a token uses, not from all of them."""
    moe = build_model(composed("model=tiny_moe").model, torch.float32)
    dense = build_model(composed("model.intermediate_size=512").model, torch.float32)
    router = 4 * 128 * 4  # layers x hidden x experts
    assert model_flops_per_token(moe, 256) == model_flops_per_token(dense, 256) + 6 * router


def test_cached_decoding_gives_the_full_forward_logits():
    """tools.generate and eval.samples decode the MoE with the KV cache, token by token."""
    model, ids = make(), tokens(1, 12)
    cache = KVCache.empty(model.config.num_hidden_layers)
    with torch.no_grad():
        full = model(ids).logits
        steps = [forward_cached(model, ids[:, :6], cache)]
        steps += [forward_cached(model, ids[:, t : t + 1], cache) for t in range(6, 12)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
