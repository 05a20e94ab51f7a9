"""The sharding plan of real presets on real pod meshes, computed on the meta device."""

from __future__ import annotations

import pytest
import torch

from conftest import composed
from models import build_model
from torchprime.chips import CHIPS
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.plan import fit_verdict, format_plan, make_plan
from torchprime.sharding import plan_parameter_specs

HBM_GIB = {name: chip.hbm_gib for name, chip in CHIPS.items()}


def plan_for(preset, sharding, dtype, state_dtype=None, **axes):
    cfg = composed(f"model={preset}", f"model/sharding={sharding}")
    model = build_model(cfg.model, dtype)
    mesh = resolve_mesh(MeshAxesConfig(**axes), MeshAxesConfig(), None)
    return make_plan(
        model, plan_parameter_specs(model, cfg.model.sharding, mesh), mesh, state_dtype
    )


def test_llama3_8b_on_256_chips_holds_a_256th_of_the_weights_per_chip():
    plan = plan_for("llama3_8b", "fsdp", torch.bfloat16, torch.float32, fsdp=256)
    assert plan.parameter_bytes == pytest.approx(8.03e9 * 2 / 256, rel=0.01)
    assert plan.gradient_bytes == plan.parameter_bytes
    # two float32 moments per parameter: 4x the bfloat16 weights
    assert plan.optimizer_bytes == pytest.approx(4 * plan.parameter_bytes, rel=0.001)
    embed = next(p for p in plan.parameters if p.name == "model.embed_tokens.weight")
    assert embed.spec == ("fsdp", None) and embed.shard_shape == (501, 4096)


def test_llama3_1_70b_with_fsdp_and_tensor_parallelism():
    plan = plan_for("llama3_1_70b", "fsdp_tp", torch.bfloat16, fsdp=64, tensor=4)
    q = next(p for p in plan.parameters if p.name == "model.layers.0.self_attn.q_proj.weight")
    assert q.spec == ("tensor", "fsdp") and q.shard_shape == (8192 // 4, 8192 // 64)
    assert plan.parameter_bytes == pytest.approx(70.55e9 * 2 / 256, rel=0.01)
    text = format_plan(plan, max_rows=5)
    assert "mesh fsdp=64 x tensor=4 (256 devices), 70.554B parameters" in text
    assert "... and 718 more parameters" in text and "optimizer state" in text


def test_the_verdict_says_when_weights_and_optimizer_state_alone_do_not_fit():
    plan = plan_for("llama3_1_405b", "fsdp", torch.bfloat16, torch.float32, fsdp=64)
    # 405.85e9 x (2 weights + 2 gradients + 8 moments) bytes / 64 chips = 71 GiB a chip
    assert plan.total_bytes == pytest.approx(405.85e9 * 12 / 64, rel=0.001)
    v5e = fit_verdict(plan, HBM_GIB["v5e"] * 2**30, "a TPU v5e chip")
    assert not v5e.fits and v5e.text.startswith("DOES NOT FIT: parameters + gradients")
    v5p = fit_verdict(plan, HBM_GIB["v5p"] * 2**30, "a TPU v5p chip")
    assert v5p.fits and "(75%)" in v5p.text


def test_activation_estimate_of_the_8b_preset_and_what_remat_and_offload_change():
    from models.memory import estimate_activations
    from torchprime.rewriting import RematConfig

    cfg = composed("model=llama3_8b")
    mesh = resolve_mesh(MeshAxesConfig(fsdp=64), MeshAxesConfig(), None)
    remat = RematConfig(
        scan_layers="model.layers", activation_checkpoint_layers=["LlamaDecoderLayer"]
    )
    cfg.model.attention_kernel = "flash"
    layer = "LlamaDecoderLayer"
    a = estimate_activations(
        cfg.model, remat, mesh, rows_per_device=4, seq_len=8192, dtype_bytes=2, layer_class=layer
    )
    assert a.tokens == 32768
    assert a.kept_bytes == 32 * 32768 * 4096 * 2  # each layer's bf16 input: 8 GiB
    logits = 32768 * 128256 * (2 + 4)  # bf16 logits and their float32 copy for the loss
    assert a.working_bytes - logits == 32768 * 2 * (4 * 4096 + 3 * 4096 + 3 * 1024 + 4 * 14336)
    plain = estimate_activations(cfg.model, RematConfig(), mesh, 4, 8192, 2, layer)
    assert plain.kept_bytes == 32 * (a.working_bytes - logits)  # every layer keeps it all
    offload = RematConfig(**{**vars(remat), "offload_tensors": ["decoder_input"]})
    off = estimate_activations(cfg.model, offload, mesh, 4, 8192, 2, layer)
    assert off.kept_bytes == 0 and off.host_bytes == a.kept_bytes
    cfg.model.attention_kernel = "sdpa"  # written-out attention keeps its probabilities too
    sdpa = estimate_activations(cfg.model, remat, mesh, 4, 8192, 2, layer)
    # and the boolean causal mask [8192, 8192] made per layer call
    assert sdpa.working_bytes - a.working_bytes == 32768 * 2 * 32 * 8192 + 8192 * 8192


def test_the_verdict_counts_the_activations_when_they_are_estimated():
    plan = plan_for("llama3_8b", "fsdp", torch.bfloat16, torch.float32, fsdp=64)
    hbm = HBM_GIB["v5p"] * 2**30
    fits = fit_verdict(plan, hbm, "a TPU v5p chip", activation_bytes=37 * 2**30)
    assert fits.fits and "about 37.00 GiB of activations (estimate)" in fits.text
    oom = fit_verdict(plan, hbm, "a TPU v5p chip", activation_bytes=148 * 2**30)
    assert not oom.fits and oom.text.startswith("LIKELY OUT OF MEMORY")


def test_the_sequence_split_over_context_divides_the_per_token_activations():
    from models.memory import estimate_activations
    from torchprime.rewriting import RematConfig

    cfg = composed("model=llama3_8b")
    remat = RematConfig(
        scan_layers="model.layers", activation_checkpoint_layers=["LlamaDecoderLayer"]
    )
    cfg.model.attention_kernel = "splash"
    by_split = {}
    for n in (1, 2, 4):
        mesh = resolve_mesh(MeshAxesConfig(fsdp=64 // n, context=n), MeshAxesConfig(), None)
        by_split[n] = estimate_activations(
            cfg.model, remat, mesh, 1, 32768, 2, "LlamaDecoderLayer", sequence_split=n
        )
    assert [a.tokens for a in by_split.values()] == [32768, 16384, 8192]
    for n in (2, 4):  # the Pallas kernels split heads: every term is per token
        assert by_split[n].kept_bytes * n == by_split[1].kept_bytes
        assert by_split[n].working_bytes * n == by_split[1].working_bytes
    # eager gathers keys and values whole (kept per layer) and its probabilities and mask keep
    # the whole key dimension: those do not fall with the split
    cfg.model.attention_kernel = "eager"
    mesh = resolve_mesh(MeshAxesConfig(fsdp=16, context=4), MeshAxesConfig(), None)
    eager = estimate_activations(cfg.model, remat, mesh, 1, 32768, 2, "LlamaDecoderLayer", 4)
    documents = estimate_activations(
        cfg.model, remat, mesh, 1, 32768, 2, "LlamaDecoderLayer", 4, segment_ids=True
    )
    kv_gathered = 2 * 8 * 128 * 32768 * 2
    probs = 8192 * 32 * 32768 * 2
    mask = 8192 * 32768  # one row: the same bytes with and without segments here
    assert eager.working_bytes - by_split[4].working_bytes == kv_gathered + probs + mask
    assert documents.working_bytes == eager.working_bytes
