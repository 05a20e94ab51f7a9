"""The torch.distributed engine: torchrun starts one process per device (gloo on the CPU here),
the config's mesh and sharding specs become a DeviceMesh, FSDP2 and tensor parallelism.

Sharding changes where numbers are computed, not what they are: every mesh gives the losses of
one process. Checkpoints move between process counts and to XLA SPMD and back; SIGTERM to one
rank stops every rank after the same step, saved. The runs are shared between the tests (each
torchrun start costs seconds of imports per process on two cores)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from conftest import composed, read_jsonl, requires_xla, run_train
from models import build_model
from torchprime.mesh import resolve_mesh
from torchprime.plan import make_plan
from torchprime.sharding import plan_parameter_specs

STEPS = ("trainer.max_steps=5", "trainer.logging_steps=1", "trainer.progress_bar=false")
TOLERANCE = 1e-5


def torchrun(processes: int, *overrides: str, script: str = "train.py", env: dict | None = None):
    """`torchrun --standalone --nproc_per_node=N SCRIPT OVERRIDES...`, as a user runs it."""
    launcher = f"-m torch.distributed.run --standalone --nproc_per_node={processes}"
    return run_train(*overrides, script=f"{launcher} {script}", env=env, timeout=900)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(out) -> list[float]:
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def one_process(cpu_run) -> list[float]:
    """The first 5 losses of the shared one-process run (the lr warms up over 20 steps, so
    max_steps does not change them)."""
    return losses(cpu_run[0])[:5]


@pytest.fixture(scope="module")
def four_fsdp(tmp_path_factory):
    """4 processes, fsdp=4, checkpoints after steps 3 and 5, written in the background (the
    tests below resume them on 2 processes and on XLA)."""
    out = tmp_path_factory.mktemp("fsdp4")
    proc = torchrun(
        4,
        "backend=cpu",
        "ici_mesh.fsdp=4",
        *STEPS,
        "trainer.checkpoint.interval=3",
        "trainer.checkpoint.async_save=true",
        f"output_dir={out}",
    )
    return out, ok(proc)


@pytest.fixture(scope="module")
def two_fsdp_sigterm(tmp_path_factory):
    """2 processes, fsdp=2; rank 1 receives SIGTERM as step 3 begins."""
    out = tmp_path_factory.mktemp("fsdp2")
    proc = torchrun(
        2,
        "3",
        "backend=cpu",
        "ici_mesh.fsdp=2",
        *STEPS,
        f"output_dir={out}",
        script="tests/e2e/train_with_sigterm.py",
        env={"SIGTERM_RANK": "1"},
    )
    return out, ok(proc)


def test_fsdp_over_four_processes_gives_the_losses_of_one(four_fsdp, one_process):
    out, proc = four_fsdp
    assert losses(out) == pytest.approx(one_process, abs=TOLERANCE)
    # One run, not four copies: one record per step, one summary, one host record per rank.
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert proc.stdout.count("run finished") == 1
    assert "step 5 written to" in proc.stdout + proc.stderr  # in the background
    step5 = out / "checkpoints" / "step_00000005"
    assert sorted(p.name for p in step5.glob("host_*.json")) == [
        f"host_0000{r}.json" for r in range(4)
    ]


def test_fsdp_with_tensor_parallelism_and_accumulation_gives_the_losses_of_one(
    tmp_path, one_process
):
    out = tmp_path / "fsdp2_tp2"
    ok(
        torchrun(
            4,
            "backend=cpu",
            "ici_mesh.fsdp=2",
            "ici_mesh.tensor=2",
            "model/sharding=fsdp_tp",
            "trainer.grad_accum_steps=2",
            *STEPS,
            f"output_dir={out}",
        )
    )
    assert losses(out) == pytest.approx(one_process, abs=TOLERANCE)
    # Each rank saved its own shards: their shapes are the plan's (plan_only) per-device shapes.
    plan = plan_of("model/sharding=fsdp_tp", "ici_mesh.fsdp=2", "ici_mesh.tensor=2")
    saved = saved_shard_shapes(out / "checkpoints" / "step_00000005")
    assert {p.name: {p.shard_shape} for p in plan.parameters} == saved


def plan_of(*overrides: str):
    cfg = composed(*overrides)
    with torch.device("meta"):
        model = build_model(cfg.model, torch.float32)
    mesh = resolve_mesh(cfg.ici_mesh, cfg.dcn_mesh, None)
    return make_plan(model, plan_parameter_specs(model, cfg.model.sharding, mesh), mesh)


def saved_shard_shapes(checkpoint) -> dict[str, set[tuple[int, ...]]]:
    """The shapes of the pieces each model tensor was saved in, from the DCP metadata."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {
        key.removeprefix("model."): {tuple(chunk.sizes) for chunk in item.chunks}
        for key, item in metadata.items()
        if key.startswith("model.")
    }


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_saved(
    two_fsdp_sigterm, one_process
):
    out, proc = two_fsdp_sigterm
    assert proc.stdout.count("stopped after step 3 (SIGTERM)") == 2  # both ranks
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
    assert losses(out) == pytest.approx(one_process[:3], abs=TOLERANCE)


def test_a_four_process_checkpoint_resumes_on_two_processes(four_fsdp, two_fsdp_sigterm):
    """The SIGTERM run goes on from the 4-process run's step 3, on its 2 processes as data
    replicas (hybrid sharding) with every layer rematerialized, and exports an HF folder."""
    out, _ = two_fsdp_sigterm
    step3 = four_fsdp[0] / "checkpoints" / "step_00000003"
    ok(
        torchrun(
            2,
            "backend=cpu",
            "ici_mesh.data=2",
            "ici_mesh.fsdp=1",
            "model/remat=layer",
            "trainer.export_hf=true",
            *STEPS,
            f"trainer.resume={step3}",
            f"output_dir={out}",
        )
    )
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert losses(out)[3:] == pytest.approx(losses(four_fsdp[0])[3:], abs=TOLERANCE)
    with safe_open(out / "hf" / "model.safetensors", "pt") as f:  # whole tensors, gathered
        assert list(f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape()) == [128, 384]
        assert len(list(f.keys())) == 3 + 9 * 4  # embedding, norm, head; 9 a layer


@requires_xla
def test_a_four_process_checkpoint_resumes_on_xla_with_four_devices(tmp_path, four_fsdp):
    source = four_fsdp[0] / "checkpoints" / "step_00000003"
    copy = tmp_path / "ckpt"
    shutil.copytree(source, copy)
    out = tmp_path / "xla"
    proc = run_train(
        "backend=xla", "ici_mesh.fsdp=4", *STEPS, f"trainer.resume={copy}", f"output_dir={out}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [4, 5]
    assert losses(out) == pytest.approx(losses(four_fsdp[0])[3:], rel=1e-5)
    # The held-out loss after the last step: 4 processes (each its rows, summed) and XLA agree.
    evaluated = [read_jsonl(o / "metrics.jsonl")[-1]["eval_loss"] for o in (out, four_fsdp[0])]
    assert evaluated[0] == pytest.approx(evaluated[1], abs=1e-4)


@requires_xla
def test_an_xla_checkpoint_resumes_on_two_processes(tmp_path, xla_run):
    xla_out, _ = xla_run  # 4 devices, fsdp=4, checkpoints every 10 steps
    out = tmp_path / "from_xla"
    step10 = xla_out / "checkpoints" / "step_00000010"
    ok(
        torchrun(
            2,
            "backend=cpu",
            "ici_mesh.fsdp=2",
            "trainer.max_steps=12",
            "trainer.logging_steps=1",
            "trainer.progress_bar=false",
            f"trainer.resume={step10}",
            f"output_dir={out}",
        )
    )
    assert losses(out) == pytest.approx(losses(xla_out)[10:12], rel=1e-5)


def nothing_written(out) -> bool:
    return not any(
        (out / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints")
    )


def test_a_mesh_that_is_not_the_world_size_stops_every_process(tmp_path):
    proc = torchrun(2, "backend=cpu", "ici_mesh.fsdp=1", f"output_dir={tmp_path}")
    assert proc.returncode != 0
    assert proc.stderr.count("each of the 2 processes is one device") == 2
    assert nothing_written(tmp_path)
