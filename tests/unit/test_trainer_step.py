"""The training step on the plain PyTorch CPU backend, in process: gradient accumulation,
clipping, skipped steps, lr multipliers, mfu, and the data position under prefetching."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from models import build_model
from models.llama import LlamaConfig
from torchprime.backend import select_backend
from torchprime.errors import ConfigError
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from trainers import make_trainer
from trainers.base_trainer import TrainingError, build_optimizer
from trainers.callbacks import Callback
from trainers.config import CheckpointConfig, OptimizerConfig, TrainerConfig
from trainers.data_position import TrackedBatches
from trainers.lm_trainer import LMTrainer
from trainers.metrics import model_flops_per_token, peak_flops, truncate_metrics

BACKEND = select_backend("cpu", cpu_devices=1)
MESH = resolve_mesh(MeshAxesConfig(fsdp=1), MeshAxesConfig(), None)
SEQ = 16


def tiny_model(seed=0):
    model = build_model(LlamaConfig(), torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def trainer(tmp_path: Path, batches=(), model=None, callbacks=(), **cfg) -> LMTrainer:
    cfg.setdefault("progress_bar", False)
    config = TrainerConfig(**cfg)
    model = model or tiny_model()
    return make_trainer(
        config,
        model,
        BACKEND,
        MESH,
        batches,
        tmp_path,
        tokens_per_step=8 * SEQ,
        flops_per_token=model_flops_per_token(model, SEQ),
        peak_flops=peak_flops(BACKEND.device_kind, config.peak_flops_per_device),
        callbacks=callbacks,
    )


def rows(n, seed=0):
    """n rows whose labels hide a different number of tokens in each row, so a mean per
    micro-batch would weight tokens unevenly."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 259, (n, SEQ), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, SEQ - 2 * i % SEQ :] = -100
    return {"input_ids": ids, "labels": labels}


def test_four_micro_batches_of_2_make_the_step_of_one_batch_of_8(tmp_path):
    batch = rows(8)
    one = trainer(tmp_path / "a")
    acc = trainer(tmp_path / "b", grad_accum_steps=4)
    big = one.train_step([batch])
    micro = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    accumulated = acc.train_step(micro)
    assert accumulated["loss"].item() == pytest.approx(big["loss"].item(), abs=1e-6)
    assert accumulated["grad_norm"].item() == pytest.approx(big["grad_norm"].item(), rel=1e-5)
    for (name, p), q in zip(one.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    # The mean of the micro-batch means is not the batch's loss here: the test can tell.
    with torch.no_grad():
        means = [acc.model(**m).loss.item() for m in micro]
    assert abs(sum(means) / 4 - big["loss"].item()) > 1e-3


def test_clipping_by_value_then_by_norm_reports_the_norm_before_clipping(tmp_path):
    t = trainer(tmp_path, max_grad_value=0.01, max_grad_norm=0.05)
    params = list(t.model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.1 if i % 2 else -0.1)
    raw = sum(p.numel() * 0.01 for p in params) ** 0.5
    norm, skip = t.clip_gradients()
    assert norm.item() == pytest.approx(raw, rel=1e-4) and not skip.item()
    clipped = torch.nn.utils.get_total_norm([p.grad for p in params])
    assert clipped.item() == pytest.approx(0.05, rel=1e-4)
    assert max(p.grad.abs().max().item() for p in params) <= 0.01


class NaNFrom(Callback):
    """Gradients turn non-finite from the given step on (a data or overflow problem); the
    weights after the step before are kept to compare."""

    def __init__(self, step):
        self.bad_from, self.trainer, self.snapshot = step, None, {}

    def step_begins(self, step):
        if step == self.bad_from:
            forward = self.trainer.forward

            def poisoned(batch):
                loss, aux = forward(batch)
                return loss * float("nan"), aux

            self.trainer.forward = poisoned

    def step_done(self, step):
        if step == self.bad_from - 1:
            self.snapshot = {
                n: p.detach().clone() for n, p in self.trainer.model.named_parameters()
            }


def test_non_finite_steps_change_nothing_and_too_many_stop_the_run(tmp_path):
    nan = NaNFrom(3)
    t = trainer(
        tmp_path,
        batches=iter(lambda: rows(8), None),
        callbacks=[nan],
        max_steps=10,
        logging_steps=1,
        max_consecutive_skips=3,
        checkpoint=CheckpointConfig(save_at_end=False),
    )
    nan.trainer = t
    with pytest.raises(TrainingError, match=r"3 steps in a row up to step 5 had non-finite"):
        t.train()
    snapshot = nan.snapshot
    for name, p in t.model.named_parameters():
        assert torch.equal(p.detach(), snapshot[name]), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 3]
    assert [r["loss"] is None for r in records] == [False, False, True, True, True]


def test_lr_multipliers_scale_the_lr_of_the_matched_parameters(tmp_path):
    opt_cfg = OptimizerConfig(
        lr_multipliers={"model.layers.*.mlp.down_proj.weight": 0.5}, weight_decay=0.0
    )
    t = trainer(tmp_path, optimizer=opt_cfg, max_grad_norm=None)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train_step([rows(8)])
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in t.model.named_parameters()}
    lr = t.cfg.optimizer.lr / t.cfg.lr_scheduler.warmup_steps  # first step of the warmup
    # Adam's first update is ±1 per element: the step is the lr itself.
    assert moved["model.layers.0.mlp.down_proj.weight"] == pytest.approx(0.5 * lr, rel=1e-3)
    assert moved["model.layers.0.mlp.up_proj.weight"] == pytest.approx(lr, rel=1e-3)


def test_an_lr_multiplier_pattern_matching_nothing_names_the_closest_parameters():
    cfg = TrainerConfig(
        optimizer=OptimizerConfig(lr_multipliers={"model.layers.*.mlp.down.weight": 2.0})
    )
    with pytest.raises(ConfigError) as e:
        build_optimizer(tiny_model(), cfg, BACKEND)
    message = str(e.value)
    assert message.startswith(
        "trainer.optimizer.lr_multipliers['model.layers.*.mlp.down.weight'] matches no "
        "parameter. Closest names: model.layers.3.mlp.down_proj.weight, "
    )


def test_model_flops_per_token_is_6n_plus_attention():
    model = tiny_model()
    embedding = 264 * 128
    n = sum(p.numel() for p in model.parameters()) - embedding
    assert model_flops_per_token(model, 256) == 6 * n + 12 * 4 * 128 * 256


def test_mfu_is_logged_on_cpu_when_the_peak_is_given(tmp_path):
    t = trainer(
        tmp_path,
        batches=iter(lambda: rows(8), None),
        max_steps=2,
        logging_steps=1,
        peak_flops_per_device=1e12,
        checkpoint=CheckpointConfig(save_at_end=False),
    )
    t.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        expected = r["tokens_per_sec"] * model_flops_per_token(t.model, SEQ) / 1e12
        assert r["mfu"] == pytest.approx(expected)
        assert {"loss", "lr", "grad_norm", "skipped_steps", "step_time_s"} <= set(r)


def test_no_mfu_on_cpu_without_a_peak(tmp_path):
    t = trainer(
        tmp_path,
        batches=iter(lambda: rows(8), None),
        max_steps=1,
        checkpoint=CheckpointConfig(save_at_end=False),
    )
    t.train()
    assert "mfu" not in json.loads((tmp_path / "metrics.jsonl").read_text())


class Counting:
    """A stateful stream: batch i holds i; the state is the count yielded."""

    def __init__(self):
        self.n = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        return self.n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_the_saved_data_position_is_the_last_consumed_batch_not_the_last_prefetched():
    tracked = TrackedBatches(Counting())
    it = iter(tracked)
    ahead = []
    producer = threading.Thread(target=lambda: ahead.extend(next(it) for _ in range(10)))
    producer.start()
    producer.join()  # a device loader 10 batches ahead
    for _ in range(3):
        tracked.mark_consumed()
    assert tracked.state_dict() == {"batches_consumed": 3, "data": {"n": 3}}
    resumed = TrackedBatches(Counting())
    resumed.load_state_dict(tracked.state_dict())
    assert next(iter(resumed)) == 4


def test_a_stream_without_state_is_resumed_by_skipping_what_was_consumed():
    tracked = TrackedBatches(iter(range(1, 100)))
    tracked.load_state_dict({"batches_consumed": 5, "data": None})
    assert next(iter(tracked)) == 6
    tracked.mark_consumed()
    assert tracked.state_dict() == {"batches_consumed": 6, "data": None}


def test_truncating_metrics_drops_steps_after_the_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 7))
    path.write_text(lines + '{"step": 7, "lo')  # a crash cut the last line
    assert truncate_metrics(path, 4) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
