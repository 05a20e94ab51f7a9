"""The main job end to end, in a subprocess, on XLA SPMD (4 virtual CPU devices) and on the
plain PyTorch CPU backend."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import requires_xla, run_train

STEPS = 30
SHORT = (f"trainer.max_steps={STEPS}", "trainer.logging_steps=1", "trainer.progress_bar=false")
REQUIRED_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def xla_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("xla")
    proc = run_train(*SHORT, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu")
    # -X importtime lists every module the process imports, on stderr.
    proc = run_train("backend=cpu", *SHORT, f"output_dir={out}", python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


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
    # The first steps compile (the optimizer state appears at step 1); after that every step,
    # logged or not, with the lr changing, runs the same graph.
    assert compiles[3:] == [compiles[3]] * (len(compiles) - 3)
    assert compiles[3] <= 4


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
        "+config=smoke", "backend=cpu", "trainer.max_steps=3", "model=tiny", "data=stdlib",
        "trainer=default", f"output_dir={tmp_path}", "trainer.progress_bar=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["run_name"] == "smoke"  # from the preset
    assert config["trainer"]["logging_steps"] == 1  # from the preset
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 3  # the command line wins
