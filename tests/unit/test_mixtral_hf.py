"""HF Mixtral folders in and out: transformers' logits with dropless routing, both expert
layouts read, an exact round trip, and another architecture refused naming the file."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_hf_interop import randomize_hf_weights

from models.hf import check_matches, load_hf, read_hf_config, save_hf
from models.llama import LlamaConfig
from models.mixtral import MixtralConfig
from models.moe import MixtralSparseMoeBlock
from torchprime.errors import ConfigError

VOCAB, T = 300, 40
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=128,
)


def hf_mixtral(seed: int = 0) -> transformers.MixtralForCausalLM:
    """A tiny random transformers Mixtral (GQA, 4 experts, 2 a token), weights drawn larger
    than HF's init and norms away from 1, so a tensor loaded into the wrong place shows."""
    cfg = transformers.MixtralConfig(**SHAPE, rms_norm_eps=1e-5, attn_implementation="eager")
    return randomize_hf_weights(transformers.MixtralForCausalLM(cfg).eval(), seed)


def tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = hf_mixtral()
    path = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(path)
    return model, path


def test_the_folder_transformers_writes_is_per_expert(hf_folder):
    _, path = hf_folder
    names = set(load_file(path / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    cfg = read_hf_config(path)
    assert type(cfg) is MixtralConfig and cfg.moe_implementation == "dropless"
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.rope_theta) == (4, 2, 1e6)


def test_logits_and_loss_match_transformers_with_dropless_routing(hf_folder):
    theirs, path = hf_folder
    ours = load_hf(path)
    ids = tokens()
    with torch.no_grad():
        expected = theirs(ids, labels=ids, output_router_logits=True)
        out = ours.eval()(ids)
        assert (out.logits - expected.logits).abs().max().item() < 1e-5
        # static shapes (XLA's form of dropless): every expert on every token, same logits
        for block in ours.modules():
            if isinstance(block, MixtralSparseMoeBlock):
                block.static_shapes = True
        assert (ours(ids).logits - expected.logits).abs().max().item() < 1e-5
        # training loss: cross-entropy + router_aux_loss_coef x aux_loss, as transformers adds
        train = ours.train()(ids, labels=ids)
    assert abs(train.metrics["aux_loss"].item() - expected.aux_loss.item()) < 1e-6
    assert abs(train.loss.item() - expected.loss.item()) < 1e-5


def test_the_fused_layout_reads_the_same(hf_folder, tmp_path):
    theirs, path = hf_folder
    fused = {n: p.detach().contiguous() for n, p in theirs.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    save_file(fused, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path).eval()(ids).logits, load_hf(path).eval()(ids).logits)


def test_round_trip_through_transformers_is_exact(hf_folder, tmp_path):
    _, path = hf_folder
    ours = load_hf(path)
    save_hf(ours, tmp_path)
    assert (
        load_file(tmp_path / "model.safetensors").keys()
        == load_file(path / "model.safetensors").keys()
    )
    for name, tensor in load_file(path / "model.safetensors").items():
        assert torch.equal(load_file(tmp_path / "model.safetensors")[name], tensor), name
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    again = load_hf(tmp_path)
    for name, p in ours.named_parameters():
        assert torch.equal(p, dict(again.named_parameters())[name]), name
    ids = tokens()
    with torch.no_grad():
        assert (reloaded(ids).logits - ours.eval()(ids).logits).abs().max().item() < 1e-5


def test_another_architecture_is_refused_naming_the_file(hf_folder, tmp_path):
    _, path = hf_folder
    raw = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "qwen2_moe"}))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: model_type='qwen2_moe'"):
        read_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="holds a mixtral checkpoint .*config.json.*'llama'"):
        check_matches(LlamaConfig(), path)
    with pytest.raises(ConfigError, match="model.num_local_experts=8 but the checkpoint has 4"):
        check_matches(MixtralConfig(**{**SHAPE, "num_local_experts": 8}), path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "sliding_window": 4096}))
    with pytest.raises(ConfigError, match="config.json: sliding_window=4096"):
        read_hf_config(tmp_path)
