"""Training can start from an HF Llama folder (model.pretrained_path)."""

from __future__ import annotations

import json

import torch

from conftest import composed, run_train
from data.eval_batches import training_holdout
from data.pipeline import TextBatches
from data.tokenizers import ByteTokenizer
from models import build_model
from models.hf import save_hf
from models.llama import LlamaConfig


def saved_tiny(path, seed=123):
    model = build_model(LlamaConfig(), torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    save_hf(model, path)
    return model


def test_training_starts_from_the_checkpoint_weights(tmp_path):
    model = saved_tiny(tmp_path / "hf")
    out = tmp_path / "run"
    proc = run_train(
        "backend=cpu",
        "ici_mesh.fsdp=1",
        f"model.pretrained_path={tmp_path / 'hf'}",
        "trainer.max_steps=1",
        "trainer.progress_bar=false",
        f"output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    cfg = composed()  # the run's data: shuffled, its held-out share left out
    batch = next(
        TextBatches(cfg.data, ByteTokenizer(), 8, seed=cfg.seed, holdout=training_holdout(cfg.eval))
    )
    with torch.no_grad():
        expected = model(batch["input_ids"], labels=batch["labels"]).loss.item()
    assert abs(first["loss"] - expected) < 1e-5


def test_a_checkpoint_of_another_architecture_is_refused_with_the_fields(tmp_path):
    saved_tiny(tmp_path / "hf")
    proc = run_train(
        "backend=cpu",
        "ici_mesh.fsdp=1",
        f"model.pretrained_path={tmp_path / 'hf'}",
        "model.hidden_size=256",
        "model.num_hidden_layers=2",
        f"output_dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2
    assert "model.hidden_size=256 but the checkpoint has 128" in proc.stderr
    assert "model.num_hidden_layers=2 but the checkpoint has 4" in proc.stderr
