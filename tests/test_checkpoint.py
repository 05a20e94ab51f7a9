"""Checkpoints: written atomically, loaded back to the same weights and optimizer state."""

from __future__ import annotations

import json

import pytest
import torch

from models import build_model
from models.llama import LlamaConfig
from torchprime.backend import select_backend
from trainers.base_trainer import build_optimizer
from trainers.checkpoint import load_checkpoint, save_checkpoint
from trainers.config import TrainerConfig


def model_and_optimizer(seed):
    model = build_model(LlamaConfig(), torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    return model, build_optimizer(model, TrainerConfig())


def one_step(model, opt):
    ids = torch.randint(0, 264, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_save_then_load_restores_weights_and_optimizer_state(tmp_path):
    backend = select_backend("cpu", cpu_devices=1)
    model, opt = model_and_optimizer(seed=0)
    one_step(model, opt)
    path = save_checkpoint(tmp_path, 7, model, opt, backend)
    assert path.name == "step_00000007"
    assert json.loads((path / "COMPLETE").read_text()) == {"step": 7}
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000007"]  # no temporary left

    fresh, fresh_opt = model_and_optimizer(seed=1)
    assert load_checkpoint(path, fresh, fresh_opt, backend) == 7
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), key
    # and training continues identically from there
    one_step(model, opt)
    one_step(fresh, fresh_opt)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_an_incomplete_checkpoint_is_refused(tmp_path):
    backend = select_backend("cpu", cpu_devices=1)
    model, opt = model_and_optimizer(seed=0)
    path = save_checkpoint(tmp_path, 1, model, opt, backend)
    (path / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(path, model, opt, backend)
