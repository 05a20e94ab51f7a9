"""Checkpoint faults on XLA SPMD (4 virtual CPU devices), in subprocesses as a user runs it: a
checkpoint written in the background holds the same tensors as a synchronous one, adds no
compilation, and a SIGKILL while a background write is in flight leaves the previous
checkpoint the newest complete one, from which trainer.resume=auto continues with the losses of
the uninterrupted run. The same holds for a SIGKILL in the middle of a synchronous write, and a
checkpoint whose tensor file was cut short is skipped by name."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import read_jsonl, requires_xla, run_train

COMMON = (
    "trainer.max_steps=8",
    "trainer.checkpoint.interval=3",
    "trainer.checkpoint.keep=null",
    "trainer.logging_steps=1",
    "trainer.progress_bar=false",
)


def tensors(folder, tmp):
    out = tmp / f"{folder.parent.parent.name}_{folder.name}.pt"
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    sync = root / "sync"
    proc = run_train(*COMMON, "trainer.checkpoint.async_save=false", f"output_dir={sync}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = root / "killed"
    # The background write of step 6 never ends; the process is killed as step 8 begins.
    proc = run_train(
        *COMMON,
        "trainer.checkpoint.async_save=true",
        f"output_dir={killed}",
        script="tests/e2e/train_with_kill.py 6 8",
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    resumed = run_train(
        *COMMON,
        "trainer.checkpoint.async_save=true",
        "trainer.resume=auto",
        f"output_dir={killed}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root, sync, killed, checkpoints, resumed


@requires_xla
def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint_newest(runs):
    _, _, _, checkpoints, resumed = runs
    assert checkpoints == [".step_00000006.tmp", "step_00000003"]
    log = resumed.stdout + resumed.stderr
    assert "skipping incomplete checkpoints" in log and ".step_00000006.tmp" in log
    assert "continuing after step 3" in log


@requires_xla
def test_the_resumed_run_has_the_losses_of_the_uninterrupted_one(runs):
    _, sync, killed, _, _ = runs
    expected = [(r["step"], r["loss"]) for r in read_jsonl(sync / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in read_jsonl(killed / "metrics.jsonl")] == expected
    # Staging and the background write add no compilation after warm-up.
    compiles = [r["compiles"] for r in read_jsonl(killed / "metrics.jsonl")]
    assert compiles[5:] == [compiles[5]] * 3 and compiles[1:3] == [compiles[1]] * 2


@requires_xla
def test_background_checkpoints_hold_the_tensors_of_synchronous_ones(runs, tmp_path):
    _, sync, killed, _, _ = runs
    for step in (3, 6, 8):
        name = f"step_{step:08d}"
        a = tensors(killed / "checkpoints" / name, tmp_path)
        b = tensors(sync / "checkpoints" / name, tmp_path)
        assert_same_tensors(a, b)
        assert (killed / "checkpoints" / name / "COMPLETE").is_file()


@requires_xla
def test_a_kill_during_a_synchronous_write_and_a_truncated_shard_are_skipped_by_name(runs):
    root, sync, _, _, _ = runs
    out = root / "sync_killed"
    # Killed inside the write of step 8, once its tensor files are written, before COMPLETE.
    proc = run_train(
        *COMMON,
        "trainer.checkpoint.async_save=false",
        f"output_dir={out}",
        script="tests/e2e/train_with_kill.py 8 0",
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    saved = out / "checkpoints"
    assert sorted(p.name for p in saved.iterdir()) == [
        ".step_00000008.tmp",
        "step_00000003",
        "step_00000006",
    ]
    assert list((saved / ".step_00000008.tmp").glob("*.distcp"))
    # And the newest complete checkpoint has lost the end of a tensor file.
    shard = sorted((saved / "step_00000006").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    resumed = run_train(
        *COMMON,
        "trainer.checkpoint.async_save=false",
        "trainer.resume=auto",
        f"output_dir={out}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "skipping incomplete checkpoints" in log and ".step_00000008.tmp" in log
    assert f"skipping {saved / 'step_00000006'}, which cannot be loaded" in log
    assert f"data file {shard.name} is 1000 bytes" in log
    assert "continuing after step 3" in log
    expected = [(r["step"], r["loss"]) for r in read_jsonl(sync / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl")] == expected
