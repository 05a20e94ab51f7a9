"""The main job end to end, in a subprocess, on XLA SPMD (4 virtual CPU devices) and on the
plain PyTorch CPU backend."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import SHORT_RUN_STEPS as STEPS
from conftest import read_jsonl, requires_xla, run_train

REQUIRED_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s"}


@requires_xla
def test_default_run_on_xla_trains_on_a_4_device_fsdp_mesh(xla_run):
    out, proc = xla_run
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert REQUIRED_KEYS | {"compiles"} <= set(r)
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert "backend: xla (4 x CPU), mesh: fsdp=4" in proc.stdout + proc.stderr
    assert "run finished" in proc.stdout


@requires_xla
def test_xla_compiles_only_while_warming_up(xla_run):
    out, _ = xla_run
    compiles = [r["compiles"] for r in read_jsonl(out / "metrics.jsonl")]
    # Step 1 compiles the step (and a small graph creating the optimizer state); after that
    # every step, logged or not, with the lr changing and a checkpoint at step 10 and 20,
    # runs the same graph.
    assert compiles[1:] == [compiles[0]] * (len(compiles) - 1)
    assert compiles[0] <= 3
    assert (out / "checkpoints" / "step_00000020" / "COMPLETE").exists()


@requires_xla
def test_scanned_layers_train_without_recompiling(tmp_path):
    proc = run_train(
        "model/remat=scan_remat",
        "trainer.max_steps=12",
        "trainer.logging_steps=1",
        "trainer.checkpoint.interval=6",
        "trainer.fail_on_recompile=true",
        "trainer.progress_bar=false",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    compiles = [r["compiles"] for r in records]
    assert compiles[2:] == [compiles[2]] * (len(compiles) - 2)
    assert records[-1]["loss"] < records[0]["loss"]


@requires_xla
def test_xla_and_cpu_backends_compute_the_same_losses(xla_run, cpu_run):
    xla_losses = [r["loss"] for r in read_jsonl(xla_run[0] / "metrics.jsonl")]
    cpu_losses = [r["loss"] for r in read_jsonl(cpu_run[0] / "metrics.jsonl")]
    assert xla_losses == pytest.approx(cpu_losses, rel=1e-4)


def test_cpu_backend_trains_without_importing_torch_xla(cpu_run):
    out, proc = cpu_run
    assert "torch_xla" not in proc.stderr  # the import-time listing names every module
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == STEPS
    for r in records:
        assert REQUIRED_KEYS <= set(r) and "compiles" not in r
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]


def test_run_writes_resolved_config_and_a_complete_checkpoint(cpu_run):
    out, proc = cpu_run
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["output_dir"] == str(out)  # interpolations resolved
    assert config["backend"] == "cpu" and config["trainer"]["max_steps"] == STEPS
    ckpt = out / "checkpoints" / f"step_{STEPS:08d}"
    assert json.loads((ckpt / "COMPLETE").read_text()) == {"step": STEPS}
    assert (ckpt / ".metadata").exists()
    assert not list((out / "checkpoints").glob(".*.tmp"))
    for line in ("steps         30", "metrics       ", "checkpoint    "):
        assert line in proc.stdout


def test_preset_and_group_and_key_overrides_compose(tmp_path):
    proc = run_train(
        "+config=smoke",
        "backend=cpu",
        "ici_mesh.fsdp=1",
        "trainer.max_steps=3",
        "model=tiny",
        "data=stdlib",
        "trainer=default",
        f"output_dir={tmp_path}",
        "trainer.progress_bar=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["run_name"] == "smoke"  # from the preset
    assert config["trainer"]["logging_steps"] == 1  # from the preset
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 3  # the command line wins
