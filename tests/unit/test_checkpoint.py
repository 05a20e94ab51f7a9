"""Checkpoints: written atomically, pruned to the newest few, loaded back to the same training
state; `trainer.resume=auto` skips incomplete and corrupt ones, naming them."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import HAS_XLA
from models import build_model
from models.llama import LlamaConfig
from torchprime.backend import select_backend
from torchprime.errors import ConfigError
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from trainers import make_trainer as trainer_of
from trainers.checkpoint import CorruptCheckpoint, check_readable, load_checkpoint, save_checkpoint
from trainers.config import CheckpointConfig, TrainerConfig

BACKEND = select_backend("cpu", cpu_devices=1)
MESH = resolve_mesh(MeshAxesConfig(fsdp=1), MeshAxesConfig(), None)


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, 259, (2, 16), generator=g)
        yield {"input_ids": ids, "labels": ids}


def make_trainer(out, seed=0, **cfg):
    model = build_model(LlamaConfig(), torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    cfg = TrainerConfig(progress_bar=False, max_steps=cfg.pop("max_steps", 4), **cfg)
    return trainer_of(cfg, model, BACKEND, MESH, batches(), out, tokens_per_step=32)


def flat(state, prefix=""):
    out = {}
    for k, v in state.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_save_then_load_restores_the_whole_training_state(tmp_path):
    t = make_trainer(tmp_path)
    t.train_step([next(batches())])
    path = save_checkpoint(tmp_path, 7, t.checkpoint_tensors(), BACKEND, {"batches_consumed": 1})
    assert path.name == "step_00000007"
    assert json.loads((path / "COMPLETE").read_text()) == {"step": 7}
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000007"]  # no temporary left

    fresh = make_trainer(tmp_path, seed=1)
    record = load_checkpoint(path, fresh.checkpoint_tensors(), BACKEND)
    # with every host's record (one here): a run on another host count finds all shards
    assert record == {
        "step": 7,
        "batches_consumed": 1,
        "hosts": [{"step": 7, "batches_consumed": 1}],
    }
    saved, loaded = flat(t.checkpoint_tensors()), flat(fresh.checkpoint_tensors())
    assert len(saved) == 39 + 39 * 3 + 3  # weights, 3 optimizer tensors each, counters
    for name, tensor in saved.items():
        assert torch.equal(tensor, loaded[name]), name
    assert fresh.step_count.item() == 1
    # and training continues identically from there
    batch = next(batches(seed=5))
    t.train_step([batch])
    fresh.train_step([batch])
    for a, b in zip(t.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)


def test_only_the_newest_keep_checkpoints_remain(tmp_path):
    t = make_trainer(tmp_path)
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, t.checkpoint_tensors(), BACKEND, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006", "step_00000008"]


def test_damage_is_found_before_loading(tmp_path):
    t = make_trainer(tmp_path)
    path = save_checkpoint(tmp_path, 1, t.checkpoint_tensors(), BACKEND)
    check_readable(path)
    data = next(path.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CorruptCheckpoint, match=rf"data file {data.name} is 100 bytes, \d+ exp"):
        check_readable(path)
    (path / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CorruptCheckpoint, match="unreadable DCP metadata"):
        check_readable(path)
    (path / "COMPLETE").unlink()
    with pytest.raises(CorruptCheckpoint, match="no COMPLETE marker"):
        load_checkpoint(path, t.checkpoint_tensors(), BACKEND)


def test_resume_auto_skips_incomplete_and_corrupt_checkpoints_naming_them(tmp_path, caplog):
    first = make_trainer(
        tmp_path, max_steps=6, logging_steps=2, checkpoint=CheckpointConfig(interval=2)
    )
    first.train()
    root = tmp_path / "checkpoints"
    (root / "step_00000006" / ".metadata").write_bytes(b"\0garbage")
    (root / "step_00000008").mkdir()  # a save that never finished: no COMPLETE
    resumed = make_trainer(tmp_path, seed=1, max_steps=6, resume="auto")
    with caplog.at_level(logging.WARNING):
        assert resumed.restore() == root / "step_00000004"
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipping incomplete checkpoints" in warnings and "step_00000008" in warnings
    assert f"skipping {root / 'step_00000006'}, which cannot be loaded: unreadable DCP" in warnings
    assert resumed.start_step == 4 and resumed.step_count.item() == 4
    # Set aside, so that neither the next resume nor the pruning takes them for this run's.
    names = sorted(p.name.split(".")[0] + ("*" if "." in p.name else "") for p in root.iterdir())
    assert names == ["step_00000002", "step_00000004", "step_00000006*", "step_00000008*"]
    assert (
        "step_00000008 is newer than the resumed step 4; renamed to step_00000008.after-"
        "resume-" in "\n".join(r.getMessage() for r in caplog.records)
    )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [1, 2, 4]  # what was logged after the checkpoint is logged again


def test_resume_auto_with_only_damaged_checkpoints_stops(tmp_path):
    t = make_trainer(tmp_path)
    path = save_checkpoint(tmp_path / "checkpoints", 2, t.checkpoint_tensors(), BACKEND)
    (path / ".metadata").write_bytes(b"")
    with pytest.raises(
        ConfigError,
        match=r"trainer.resume=auto: no checkpoint in .* can be "
        r"loaded \(step_00000002\)",
    ):
        make_trainer(tmp_path, resume="auto").restore()


def test_resume_from_a_folder_that_is_not_a_complete_checkpoint_names_the_key(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match=r"trainer.resume=.*half: cannot load it: no COMPLETE"):
        make_trainer(tmp_path, resume=str(tmp_path / "half")).restore()


@pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed")
def test_xla_tensors_split_on_some_axes_and_replicated_on_others_are_saved(tmp_path):
    """On an fsdp x tensor mesh a norm weight split over fsdp only has two copies of each
    shard; torch_xla's planner alone dropped such tensors from the checkpoint."""
    xla = select_backend("xla", cpu_devices=4)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=2, tensor=2), MeshAxesConfig(), 4)
    specs = {"norm": ("fsdp",), "head": ("tensor",), "matrix": ("fsdp", "tensor"), "copy": (None,)}
    values = {name: torch.arange(16.0) + i for i, name in enumerate(specs)}
    values["matrix"] = torch.arange(64.0).reshape(8, 8)

    def state(source):
        return {"model": {n: xla.place(source[n].clone(), mesh, specs[n]) for n in specs}}

    path = save_checkpoint(tmp_path, 1, state(values), xla)
    fresh = state({n: torch.zeros_like(v) for n, v in values.items()})
    load_checkpoint(path, fresh, xla)
    for name, tensor in fresh["model"].items():
        assert torch.equal(tensor.cpu(), values[name]), name
