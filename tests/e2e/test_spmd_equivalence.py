"""The same training steps on different meshes give the same losses: sharding changes where
numbers are computed, not what they are."""

from __future__ import annotations

import pytest

from conftest import read_jsonl, requires_xla, run_train

STEPS = ("trainer.max_steps=3", "trainer.logging_steps=1", "trainer.progress_bar=false")


def losses(out):
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl")][:3]


def run(tmp_path, name, *overrides):
    out = tmp_path / name
    proc = run_train(*STEPS, *overrides, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(out)


@requires_xla
def test_fsdp_tensor_parallel_one_device_and_eager_agree(tmp_path, xla_run, cpu_run):
    fsdp = losses(xla_run[0])  # the default: fsdp over 4 devices
    fsdp_tp = run(
        tmp_path, "fsdp2_tp2", "model/sharding=fsdp_tp", "ici_mesh.fsdp=2", "ici_mesh.tensor=2"
    )
    single = run(tmp_path, "one", "ici_mesh.fsdp=1")
    assert len(fsdp) == 3 and fsdp[2] < fsdp[0]
    assert fsdp_tp == pytest.approx(fsdp, rel=1e-5)
    assert single == pytest.approx(fsdp, rel=1e-5)
    assert losses(cpu_run[0]) == pytest.approx(single, rel=1e-4)


@requires_xla
def test_context_parallelism_alone_on_two_devices_gives_the_losses_of_one(tmp_path):
    """The command a user types: the sequence split over context=2 (packed documents,
    load-balanced) trains as one device does."""
    packed = ("data.packing=document",)
    split = run(
        tmp_path,
        "context2",
        *packed,
        "cpu_devices=2",
        "ici_mesh.fsdp=1",
        "ici_mesh.context=2",
        "model/sharding=fsdp_cp",
        "model.load_balance_context=true",
    )
    single = run(tmp_path, "one", *packed, "backend=cpu", "ici_mesh.fsdp=1")
    assert split[2] < split[0]
    assert split == pytest.approx(single, abs=1e-5)
