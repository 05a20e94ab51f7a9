"""The tiny MoE through train.py: started from an HF Mixtral folder, its router metrics in
metrics.jsonl, its export loaded by transformers; a Llama folder refused naming the file."""

from __future__ import annotations

import transformers

from conftest import read_jsonl, run_train

ROUTER_METRICS = ("aux_loss", "z_loss", "dropped_fraction", "max_expert_load", "min_expert_load")


def tiny_moe_hf(path) -> None:
    """An HF Mixtral folder with tiny_moe's architecture, written by transformers itself."""
    cfg = transformers.MixtralConfig(
        vocab_size=264,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
    )
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)


def test_the_tiny_moe_trains_from_an_hf_folder_logs_its_router_and_exports(tmp_path):
    tiny_moe_hf(tmp_path / "hf")
    out = tmp_path / "run"
    proc = run_train(
        "+config=tiny_moe",
        "backend=cpu",
        "ici_mesh.fsdp=1",
        f"model.pretrained_path={tmp_path / 'hf'}",
        "model.capacity_factor=0.5",  # half the slots: some assignments must drop
        "trainer.max_steps=3",
        "trainer.logging_steps=1",
        "trainer.export_hf=true",
        "trainer.progress_bar=false",
        "eval.interval=null",
        f"output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(k in r for k in ROUTER_METRICS), r
        assert 0.5 <= r["dropped_fraction"] < 1  # capacity for half the assignments
        assert r["max_expert_load"] >= 1 >= r["min_expert_load"] >= 0
        assert r["aux_loss"] > 0  # E x sum_e f_e P_e: k (here 2) at perfect balance
    exported = transformers.MixtralForCausalLM.from_pretrained(out / "hf")
    assert exported.config.num_local_experts == 4


def test_a_llama_folder_is_refused_for_the_moe_naming_its_config(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=264, hidden_size=128, intermediate_size=256, num_hidden_layers=4
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    proc = run_train(
        "+config=tiny_moe",
        "backend=cpu",
        "ici_mesh.fsdp=1",
        f"model.pretrained_path={tmp_path / 'hf'}",
        f"output_dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2
    assert f"holds a llama checkpoint ({tmp_path / 'hf' / 'config.json'})" in proc.stderr
    assert "model.name='mixtral'" in proc.stderr
