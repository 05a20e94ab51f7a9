"""Resuming reproduces the uninterrupted run, in subprocesses as users run it: 8 steps straight
vs 4 steps, stopped, then `trainer.resume=auto` for the rest (the lr schedule spans
trainer.max_steps=8 in every run). On backend=cpu the first run stops at trainer.stop_at_step=4
(with wandb on, offline, whose files are read back); on XLA (4 virtual devices) a SIGTERM
arrives in the middle of step 4, as a TPU preemption sends it. Also: XLA compilations around
checkpoints, and a checkpoint saved on 4 devices resumed on 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import requires_xla, run_train
from trainers.metrics import read_metrics

# Rows of 64 tokens keep the steps cheap; the model is the default tiny one.
RUN = (
    "trainer.max_steps=8",
    "trainer.logging_steps=1",
    "trainer.progress_bar=false",
    "data.block_size=64",
)
STRAIGHT = (*RUN, "trainer.checkpoint.interval=4")


def train(*overrides, torchax=False, sigterm_at=None):
    """train.py in a subprocess. `torchax`: check that the run imported torchax. `sigterm_at`:
    the process sends itself SIGTERM when that step begins (tests/e2e/train_with_sigterm.py)."""
    script = "train.py"
    if sigterm_at is not None:
        script = f"tests/e2e/train_with_sigterm.py {sigterm_at}"
    # -X importtime lists every module the process imports, on stderr.
    flags = ("-X", "importtime") if torchax else ()
    proc = run_train(*overrides, python_flags=flags, script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if torchax:
        # torchax registers itself as torch's custom device when imported (torch_xla imports
        # it in mark_sharding), which changes the path DCP takes to write: checkpoints on XLA
        # are tested as they run on a machine with torchax.
        assert "| torchax\n" in proc.stderr, "torchax was not imported"
    proc.log = proc.stdout + proc.stderr  # Hydra logs to stdout; wandb and warnings to stderr
    return proc


def losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


# -- plain PyTorch on the CPU: bit for bit ---------------------------------------------------
@pytest.fixture(scope="module")
def cpu_straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu_straight")
    train("backend=cpu", "ici_mesh.fsdp=1", *STRAIGHT, f"output_dir={out}")
    return out


@pytest.fixture(scope="module")
def cpu_resumed(tmp_path_factory):
    """Stopped after step 4, then resumed; wandb on (offline) and the HF export at the end."""
    out = tmp_path_factory.mktemp("cpu_resumed")
    common = ("backend=cpu", "ici_mesh.fsdp=1", *RUN, f"output_dir={out}", "wandb.enabled=true")
    first = train(*common, "trainer.stop_at_step=4")
    second = train(*common, "trainer.resume=auto", "trainer.export_hf=true")
    return out, first, second


def test_a_run_stopped_at_step_4_and_resumed_logs_the_same_losses_bit_for_bit(
    cpu_straight, cpu_resumed
):
    out, first, second = cpu_resumed
    assert "run stopped (trainer.stop_at_step=4)" in first.stdout
    assert "steps         4 of 8" in first.stdout
    assert "resume: continuing after step 4" in second.log
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))
    assert losses(out) == losses(cpu_straight)  # identical floats, not approximately


def test_the_resumed_run_exports_an_hf_folder_at_the_end(cpu_resumed):
    from safetensors import safe_open

    out, _, second = cpu_resumed
    assert f"hf export     {out / 'hf'}" in second.stdout
    with safe_open(str(out / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").shape == (128,)
    assert (out / "hf" / "config.json").exists()


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """step → logged values, read from an offline run's .wandb file: a LevelDB-style log
    (7-byte header ':W&B' + magic + version; 32 KiB blocks of records, each with a 7-byte
    header: CRC32, length, type full/first/middle/last) of wandb's protobuf Records."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    history, pos, pending = {}, 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                history[record.history.step.num] = items
    return history


def test_wandb_continues_the_same_run_and_holds_the_logged_losses(cpu_resumed):
    out, first, second = cpu_resumed
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # one directory per process, one wandb run: the same id
    logged = {**wandb_history(runs[0]), **wandb_history(runs[1])}
    by_step = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(logged) == list(range(1, 9))
    for step, values in logged.items():
        assert values["loss"] == pytest.approx(by_step[step]["loss"], rel=1e-7)
        assert values["lr"] == pytest.approx(by_step[step]["lr"], rel=1e-7)


# -- XLA SPMD on 4 virtual CPU devices -------------------------------------------------------
@pytest.fixture(scope="module")
def xla_straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("xla_straight")
    proc = train(*STRAIGHT, f"output_dir={out}", torchax=True)
    return out, proc


@pytest.fixture(scope="module")
def xla_preempted(tmp_path_factory):
    """SIGTERM in the middle of step 4, then resumed."""
    out = tmp_path_factory.mktemp("xla_preempted")
    first = train(*RUN, f"output_dir={out}", sigterm_at=4, torchax=True)
    second = train(
        *RUN,
        f"output_dir={out}",
        "trainer.resume=auto",
        "trainer.checkpoint.interval=2",
        torchax=True,
    )
    return out, first, second


@requires_xla
def test_xla_checkpoints_do_not_recompile_the_training_step(xla_straight):
    out, proc = xla_straight
    compiles = [r["compiles"] for r in read_metrics(out / "metrics.jsonl")]
    # One small graph creates the optimizer state, one is the step: from the first step on,
    # through the checkpoint saved after step 4, nothing more is compiled.
    assert compiles == [2] * 8
    assert "checkpoint: step 4 saved" in proc.log
    assert proc.log.count(" 0 compilations)") == 2  # the saves at steps 4 and 8


@requires_xla
def test_xla_run_preempted_by_sigterm_resumes_to_the_same_losses(xla_straight, xla_preempted):
    out, first, second = xla_preempted
    assert "run stopped (SIGTERM)" in first.stdout and "steps         4 of 8" in first.stdout
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))
    assert losses(out) == pytest.approx(losses(xla_straight[0]), rel=0, abs=1e-6)
    # The resumed process compiles the optimizer state's graph, one small graph that places
    # the loaded replicated tensors, and the step; nothing more through its checkpoints (after
    # steps 6 and 8).
    assert [r["compiles"] for r in read_metrics(out / "metrics.jsonl")][4:] == [3] * 4
    assert "dropped, 1 compilations)" in second.log
    assert second.log.count(" 0 compilations)") == 2


@requires_xla
def test_a_checkpoint_from_4_devices_resumes_on_2(xla_straight, tmp_path):
    straight, _ = xla_straight
    checkpoint = straight / "checkpoints" / "step_00000004"
    proc = train(
        *RUN,
        "cpu_devices=2",
        "ici_mesh.fsdp=2",
        f"output_dir={tmp_path}",
        f"trainer.resume={checkpoint}",
        torchax=True,
    )
    assert "mesh: fsdp=2" in proc.log
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 6, 7, 8]
    # Another device count sums in another order: equal up to float32 rounding.
    assert [r["loss"] for r in records] == pytest.approx(losses(straight)[4:], rel=1e-5)
