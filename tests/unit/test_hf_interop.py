"""HF Llama folders in and out: the same logits as transformers, a lossless round trip, and
errors that name the tensor or key at fault."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import requires_xla
from models import build_model
from models.hf import load_hf, read_hf_config, save_hf
from models.llama import LlamaConfig, RopeScalingConfig
from models.masks import padding_bias
from torchprime.backend import select_backend
from torchprime.errors import ConfigError
from torchprime.materialize import materialize
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.sharding import ShardingConfig, plan_parameter_specs

VOCAB, T = 300, 48  # vocab splits over 4 devices; T > original_max_position_embeddings
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
TOL = dict(rtol=1e-5, atol=1e-5)
#: The tiny architecture both sides build: HF's LlamaConfig and ours share these field names.
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def hf_llama(tie: bool = False, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny random transformers Llama: GQA (4 heads, 2 KV heads) and Llama 3.1 RoPE."""
    cfg = transformers.LlamaConfig(
        **SHAPE,
        rms_norm_eps=1e-5,
        rope_parameters=dict(ROPE),  # transformers 5 layout; it edits the dict it is given
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return randomize_hf_weights(transformers.LlamaForCausalLM(cfg).eval(), seed)


def randomize_hf_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Our own draw, larger than HF's init (so the logits are far from zero), and random norm
    weights (HF sets them to 1, which would hide a norm loaded into the wrong place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def max_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (ours - theirs).abs().max().item()


@pytest.fixture
def hf_folder(tmp_path):
    model = hf_llama()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_config_reads_both_rope_layouts(hf_folder):
    _, path = hf_folder
    cfg = read_hf_config(path)
    assert (cfg.vocab_size, cfg.num_key_value_heads, cfg.resolved_head_dim) == (VOCAB, 2, 16)
    assert cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.rope_scaling == RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 32)

    raw = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw  # transformers 5 wrote it
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"}
    legacy["rope_theta"] = 500000
    legacy["rope_scaling"] = {k: v for k, v in ROPE.items() if k not in ("rope_type", "rope_theta")}
    legacy["rope_scaling"]["type"] = "llama3"  # the oldest spelling of rope_type
    (path / "config.json").write_text(json.dumps(legacy))
    assert read_hf_config(path) == cfg


def test_logits_match_transformers(hf_folder):
    hf, path = hf_folder
    ours = load_hf(path)
    ids = tokens()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids).logits
    print(f"\nparity cpu, no padding: max abs logit error {max_err(got, expected):.3g}")
    assert expected.abs().max() > 1  # far from zero, so the tolerance means something
    torch.testing.assert_close(got, expected, **TOL)


def test_logits_match_transformers_with_right_padding(hf_folder):
    hf, path = hf_folder
    ours = load_hf(path)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # the second row is 30 tokens, then padding
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_bias=padding_bias(mask)).logits
    real = mask.bool()
    err = max_err(got[real], expected[real])
    print(f"\nparity cpu, right padding: max abs logit error {err:.3g}")
    torch.testing.assert_close(got[real], expected[real], **TOL)


def test_logits_match_transformers_with_left_padding(hf_folder):
    # Left padding is where a broken mask shows: real tokens come after the padding and would
    # attend to it. Positions stay 0..T-1 in both models (transformers does not shift them).
    hf, path = hf_folder
    ours = load_hf(path)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_bias=padding_bias(mask)).logits
        unmasked = ours(ids).logits
    err = max_err(got[1, 12:], expected[1, 12:])
    print(f"\nparity cpu, left padding: max abs logit error {err:.3g}")
    torch.testing.assert_close(got[:, 12:], expected[:, 12:], **TOL)
    assert max_err(unmasked[1, 12:], expected[1, 12:]) > 1e-2  # the mask really matters here


@requires_xla
def test_logits_match_transformers_on_xla_sharded(hf_folder):
    hf, path = hf_folder
    backend = select_backend("xla", cpu_devices=4)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), backend.device_count)
    sharding = ShardingConfig(
        parameters={
            "model.layers.*.mlp.down_proj.weight": [None, "fsdp"],
            "model.embed_tokens.weight": ["fsdp", None],
        }
    )
    ours = load_hf(path, backend=backend, mesh=mesh, sharding=sharding)
    params = dict(ours.named_parameters())
    assert backend.sharding_of(params["model.embed_tokens.weight"]) == "{devices=[4,1]0,1,2,3}"
    assert backend.sharding_of(params["model.layers.1.mlp.down_proj.weight"]) == (
        "{devices=[1,4]0,1,2,3}"
    )
    ids = tokens(batch=4)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids.to(backend.device)).logits
        backend.sync()
        got = got.cpu()
    print(f"\nparity xla fsdp=4: max abs logit error {max_err(got, expected):.3g}")
    torch.testing.assert_close(got, expected, **TOL)


def test_tied_embeddings_from_sharded_files(tmp_path):
    hf = hf_llama(tie=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_hf(tmp_path)
    assert ours.config.tie_word_embeddings
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, **TOL)

    # And back: the saved folder has no lm_head, and transformers ties it again.
    save_hf(ours, tmp_path / "out")
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
    again, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert again.lm_head.weight is again.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, hf(input_ids=ids).logits, **TOL)


def our_llama() -> torch.nn.Module:
    """Our tiny Llama, initialized through materialize as in training."""
    cfg = LlamaConfig(
        **SHAPE,
        rope_theta=500000.0,
        rope_scaling=RopeScalingConfig(original_max_position_embeddings=32),
        initializer_range=0.1,
        attention_kernel="eager",
    )
    model = build_model(cfg, torch.float32)
    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    specs = plan_parameter_specs(model, cfg.sharding, mesh)
    generator = torch.Generator().manual_seed(0)
    materialize(model, specs, mesh, backend, model.init_module_weights, generator)
    with torch.no_grad():  # norms start at 1; make them differ so a mixup would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model


def test_round_trip_through_transformers(tmp_path):
    ours = our_llama()
    save_hf(ours, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0 and raw["rope_scaling"]["rope_type"] == "llama3"
    assert raw["dtype"] == raw["torch_dtype"] == "float32"

    hf, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 32
    ids = tokens()
    with torch.no_grad():
        expected, got = hf(input_ids=ids).logits, ours(ids).logits
    print(f"\nround trip via transformers: max abs logit error {max_err(got, expected):.3g}")
    torch.testing.assert_close(got, expected, **TOL)

    back = load_hf(tmp_path)
    mine = dict(ours.named_parameters())
    assert [n for n, _ in back.named_parameters()] == list(mine)
    for name, p in back.named_parameters():
        assert torch.equal(p, mine[name]), name
    assert torch.equal(back.model.rotary_emb.inv_freq, ours.model.rotary_emb.inv_freq)


def test_save_in_bfloat16(tmp_path):
    ours = our_llama()
    save_hf(ours, tmp_path, dtype=torch.bfloat16)
    saved = load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    back = load_hf(tmp_path, dtype=torch.bfloat16)
    w = ours.model.layers[0].mlp.up_proj.weight
    assert torch.equal(back.model.layers[0].mlp.up_proj.weight, w.to(torch.bfloat16))
    assert back.model.rotary_emb.inv_freq.dtype == torch.float32


def rewrite_weights(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_a_missing_tensor_is_named(hf_folder):
    _, path = hf_folder
    rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConfigError) as e:
        load_hf(path)
    assert "tensor model.layers.1.mlp.up_proj.weight (shape [128, 64]) is missing" in str(e.value)


def test_a_misshapen_tensor_names_both_shapes(hf_folder):
    _, path = hf_folder
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_weights(path, lambda t: t.update({name: t[name].T.contiguous()}))
    with pytest.raises(ConfigError) as e:
        load_hf(path)
    assert f"tensor {name} has shape [64, 32], the model expects [32, 64]" in str(e.value)
    assert "model.safetensors" in str(e.value)


def test_unused_tensors_are_listed(hf_folder):
    _, path = hf_folder
    extra = "model.layers.2.mlp.up_proj.weight"
    rewrite_weights(path, lambda t: t.update({extra: torch.zeros(128, 64)}))
    with pytest.raises(ConfigError) as e:
        load_hf(path)
    assert f"1 tensors of the checkpoint are not used by the model: {extra}." in str(e.value)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("model_type", "mistral", "model_type='mistral'"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("attention_bias", True, "attention_bias=True"),
        ("mlp_bias", True, "mlp_bias=True"),
        ("rope_parameters", {"rope_type": "yarn"}, "rope_parameters.rope_type='yarn'"),
    ],
)
def test_unsupported_configs_name_the_key_and_file(hf_folder, key, value, needle):
    _, path = hf_folder
    raw = json.loads((path / "config.json").read_text())
    raw[key] = value
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        load_hf(path)
    assert needle in str(e.value) and str(path / "config.json") in str(e.value)
