"""Loss-spike skipping on XLA SPMD (4 virtual CPU devices), in subprocesses as a user runs it:
the poisoned step is skipped on the device, later losses are those of a run whose update of
that batch was skipped by construction, and no step compiles after warm-up. Bad settings stop
the run at start-up naming the key."""

from __future__ import annotations

import pytest

from conftest import read_jsonl, requires_xla, run_train

POISONED = 7
COMMON = (
    "trainer.max_steps=10",
    "trainer.logging_steps=1",
    "trainer.progress_bar=false",
    "trainer.checkpoint.save_at_end=false",
)
SPIKE = ("trainer.spike.enabled=true", "trainer.spike.warmup_steps=3")


def poisoned_run(out, factor, *overrides):
    proc = run_train(
        *COMMON,
        *overrides,
        f"output_dir={out}",
        script=f"tests/e2e/train_with_poison.py {POISONED} {factor}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_jsonl(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spike_xla")
    return {
        "spiked": poisoned_run(root / "spiked", 1000.0, *SPIKE),
        "never_trained": poisoned_run(root / "never", "nan"),
    }


@requires_xla
def test_xla_skips_the_poisoned_step_on_the_device_without_recompiling(runs):
    records = runs["spiked"]
    assert [r["skipped_steps"] for r in records] == [0] * 6 + [1] * 4
    assert [r["loss_spike_skips"] for r in records] == [0] * 6 + [1] * 4
    compiles = [r["compiles"] for r in records]
    assert compiles[2:] == [compiles[2]] * (len(compiles) - 2)
    assert compiles[2] == runs["never_trained"][2]["compiles"]  # the detector adds no graph


@requires_xla
def test_xla_later_losses_are_those_of_a_run_that_never_trained_on_the_batch(runs):
    spiked = [r["loss"] for r in runs["spiked"]]
    never = [r["loss"] for r in runs["never_trained"]]
    assert never[POISONED - 1] is None and spiked[POISONED - 1] > 100
    assert spiked[: POISONED - 1] == never[: POISONED - 1]
    assert spiked[POISONED:] == never[POISONED:]


def test_spike_settings_out_of_range_stop_the_run_naming_the_key(tmp_path):
    proc = run_train(
        "backend=cpu",
        "ici_mesh.fsdp=1",
        "trainer.spike.enabled=true",
        "trainer.spike.ema_decay=1.5",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 2
    assert "trainer.spike.ema_decay=1.5: must be in (0, 1)." in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
