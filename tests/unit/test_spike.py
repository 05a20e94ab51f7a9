"""Loss-spike skipping on the plain PyTorch CPU backend, in process: a poisoned step is skipped
and changes nothing, later steps are those of a run whose update of that batch was skipped by
construction (non-finite gradients), and the statistics survive a checkpoint exactly.
The same on XLA (skip on the device, no recompilation): tests/e2e/test_spike_xla.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer_step import rows, tiny_model, trainer

from trainers.callbacks import Callback
from trainers.config import CheckpointConfig, TrainerConfig
from trainers.spike import SpikeConfig

POISONED = 7
SPIKE = SpikeConfig(enabled=True, warmup_steps=3, z_threshold=6.0)


class ScaleLossAt(Callback):
    """Multiplies the loss of one step by `factor` (a bad batch), and keeps the parameters
    after the step before it and after it to compare."""

    def __init__(self, step: int, factor: float):
        self.step, self.factor, self.trainer = step, factor, None
        self.before, self.after = {}, {}

    def step_begins(self, step):
        t = self.trainer
        if step == self.step:
            forward = type(t).forward.__get__(t)

            def poisoned(batch):
                loss, aux = forward(batch)
                return loss * self.factor, aux

            t.forward = poisoned
        elif "forward" in vars(t):
            del t.forward

    def step_done(self, step):
        params = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}
        if step == self.step - 1:
            self.before = params
        elif step == self.step:
            self.after = params


def batches():
    """A different batch at every step, the same sequence in every run."""
    return (rows(8, seed=i) for i in range(10_000))


def run(tmp_path: Path, factor: float, spike: SpikeConfig, max_steps=10, **cfg):
    hook = ScaleLossAt(POISONED, factor)
    t = trainer(
        tmp_path,
        batches=batches(),
        callbacks=[hook],
        max_steps=max_steps,
        logging_steps=1,
        spike=spike,
        checkpoint=CheckpointConfig(save_at_end=False),
        **cfg,
    )
    hook.trainer = t
    t.train()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return t, hook, [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spike")
    return {
        # A bad batch: its loss (and so its gradients) 1000 times too large.
        "spiked": run(root / "spiked", 1000.0, SPIKE),
        # The reference: that batch's update skipped by construction (non-finite gradients,
        # the existing skip), no spike detection.
        "never_trained": run(root / "never", float("nan"), SpikeConfig()),
        # No bad batch: nothing is skipped.
        "clean": run(root / "clean", 1.0, SPIKE),
    }


def test_the_poisoned_step_is_skipped_and_changes_nothing(runs):
    t, hook, records = runs["spiked"]
    assert [r["skipped_steps"] for r in records] == [0] * 6 + [1] * 4
    # The reason: the loss and the grad norm both spiked at that step, and only then.
    assert [r["loss_spike_skips"] for r in records] == [0] * 6 + [1] * 4
    assert [r["grad_norm_spike_skips"] for r in records] == [0] * 6 + [1] * 4
    assert records[POISONED - 1]["loss_z"] > 100 and records[POISONED - 2]["loss_z"] < 6
    for name, p in hook.after.items():
        assert torch.equal(p, hook.before[name]), name
    assert t.optimizer.state[next(t.model.parameters())]["step"].item() == 9


def test_later_losses_are_those_of_a_run_that_never_trained_on_the_batch(runs):
    spiked = [r["loss"] for r in runs["spiked"][2]]
    never = [r["loss"] for r in runs["never_trained"][2]]
    clean = [r["loss"] for r in runs["clean"][2]]
    assert never[POISONED - 1] is None  # non-finite, logged as null
    assert spiked[: POISONED - 1] == never[: POISONED - 1] == clean[: POISONED - 1]
    assert spiked[POISONED:] == never[POISONED:]
    # ... and not those of the run that trained on it: the comparison can fail.
    assert spiked[POISONED:] != clean[POISONED:]


def test_a_clean_run_skips_nothing(runs):
    records = runs["clean"][2]
    assert {r["skipped_steps"] for r in records} == {0}
    assert max(r["loss_z"] for r in records) < SPIKE.z_threshold


def test_the_statistics_are_checkpointed_and_a_resume_decides_the_same(tmp_path):
    every = CheckpointConfig(interval=5, save_at_end=False)
    hook = ScaleLossAt(POISONED, 1000.0)
    first = trainer(
        tmp_path / "r",
        batches=batches(),
        callbacks=[hook],
        max_steps=10,
        stop_at_step=5,
        logging_steps=1,
        spike=SPIKE,
        checkpoint=every,
    )
    hook.trainer = first
    first.train()
    hook = ScaleLossAt(POISONED, 1000.0)
    resumed = trainer(
        tmp_path / "r",
        batches=batches(),
        callbacks=[hook],
        max_steps=10,
        logging_steps=1,
        spike=SPIKE,
        checkpoint=every,
        resume="auto",
    )
    hook.trainer = resumed
    assert resumed.restore() is not None and resumed.start_step == 5
    assert resumed.spike.observed.item() == 5
    resumed.train()
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    _, _, straight = run(tmp_path / "straight", 1000.0, SPIKE)
    for key in ("loss", "grad_norm", "loss_z", "grad_norm_z", "skipped_steps"):
        assert [r[key] for r in records] == [r[key] for r in straight], key


def test_settings_out_of_range_name_the_key():
    cfg = TrainerConfig(
        spike=SpikeConfig(z_threshold=0.0, warmup_steps=0, ema_decay=1.0, std_floor=-1.0)
    )
    assert cfg.problems() == [
        "trainer.spike.z_threshold=0.0: must be positive.",
        "trainer.spike.warmup_steps=0: must be at least 1.",
        "trainer.spike.ema_decay=1.0: must be in (0, 1).",
        "trainer.spike.std_floor=-1.0: must be 0 or more.",
    ]


def test_spike_state_is_only_in_checkpoints_of_runs_that_use_it(tmp_path):
    off = trainer(tmp_path / "off", model=tiny_model())
    on = trainer(tmp_path / "on", model=tiny_model(), spike=SPIKE)
    assert "spike" not in off.checkpoint_tensors()
    assert set(on.checkpoint_tensors()["spike"]) == {
        "observed",
        "loss_mean",
        "grad_norm_mean",
        "loss_var",
        "grad_norm_var",
        "loss_skips",
        "grad_norm_skips",
    }


def test_turning_spike_skipping_on_or_off_at_a_resume_keeps_the_checkpoint(tmp_path, caplog):
    every = CheckpointConfig(interval=3, save_at_end=False)
    common = dict(batches=batches(), logging_steps=1, checkpoint=every)
    trainer(tmp_path / "off", max_steps=3, **common).train()
    on = trainer(tmp_path / "off", max_steps=6, resume="auto", spike=SPIKE, **common)
    with caplog.at_level("WARNING"):
        assert on.restore() == tmp_path / "off" / "checkpoints" / "step_00000003"
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "step_00000003 holds no spike tensors" in warned
    assert on.start_step == 3 and on.step_count.item() == 3 and on.spike.observed.item() == 0
    on.train()  # the statistics start afresh, warming up again
    assert on.spike.observed.item() == 3
    off = trainer(tmp_path / "off", max_steps=9, resume="auto", **common)
    assert off.restore() == tmp_path / "off" / "checkpoints" / "step_00000006"
    assert off.start_step == 6 and off.spike is None
