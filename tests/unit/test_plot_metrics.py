"""tools.plot_metrics: a PNG from a run's metrics.jsonl, and errors that name the file."""

from __future__ import annotations

import json

import pytest
import torch

from models import build_model
from models.llama import LlamaConfig
from tools.plot_metrics import main, panel_series
from torchprime.backend import select_backend
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from trainers import make_trainer
from trainers.config import CheckpointConfig, TrainerConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run's output_dir: three logged steps of the tiny model on the CPU."""
    out = tmp_path_factory.mktemp("run")
    model = build_model(LlamaConfig(num_hidden_layers=1), torch.float32).to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainerConfig(
        max_steps=3,
        logging_steps=1,
        progress_bar=False,
        checkpoint=CheckpointConfig(save_at_end=False),
    )
    make_trainer(
        cfg,
        model,
        select_backend("cpu", cpu_devices=1),
        resolve_mesh(MeshAxesConfig(fsdp=1), MeshAxesConfig(), None),
        iter(lambda: {"input_ids": ids, "labels": ids}, None),
        out,
        tokens_per_step=32,
    ).train()
    return out


def test_writes_a_png_next_to_the_metrics_of_an_output_dir(run_dir):
    out = main([str(run_dir)])
    assert out == run_dir / "metrics.png"
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_writes_where_out_says_from_the_metrics_file(run_dir, tmp_path):
    out = main([str(run_dir / "metrics.jsonl"), "--out", str(tmp_path / "loss.png")])
    assert out == tmp_path / "loss.png" and out.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_a_missing_or_empty_file_is_an_error_naming_it(tmp_path, capsys, content):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert str(path) in capsys.readouterr().err


def test_the_eval_loss_is_drawn_beside_the_training_loss(tmp_path):
    records = [{"step": s, "loss": 5.0 - s, "lr": 1e-3} for s in range(1, 5)]
    records[1].update(eval_loss=3.5, eval_ppl=33.1, eval_tokens=100)
    records[3].update(eval_loss=2.5, eval_ppl=12.2, eval_tokens=100)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (label, curves), _ = panel_series(records)
    assert label == "loss"
    assert curves == [
        ("train", [1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0]),
        ("eval (held-out)", [2, 4], [3.5, 2.5]),
    ]
    assert main([str(path)]).read_bytes().startswith(PNG_SIGNATURE)
