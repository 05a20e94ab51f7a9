"""Periodic held-out evaluation in real runs, in process: the same eval loss on the CPU
backend and on XLA SPMD over 4 devices, one compilation for the evaluation graph, training
untouched by it, and eval_only runs of a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import composed, read_jsonl, requires_xla
from data.eval_batches import cut_eval_batches
from data.tokenizers import ByteTokenizer
from models import build_model
from models.llama import IGNORE_INDEX
from run.evaluation import run_eval_only
from run.training import run_training
from tools.generate import main as generate_main
from torchprime.backend import select_backend
from torchprime.errors import ConfigError
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from trainers.evaluator import Evaluator

STEPS = 6
RUN = (
    f"trainer.max_steps={STEPS}",
    "trainer.logging_steps=1",
    "trainer.progress_bar=false",
    "trainer.global_batch_size=4",
    "data.block_size=64",
    "eval.steps=3",
)
EVALUATED = ("eval.interval=2",)  # after steps 2, 4 and 6 (the last)
NOT_EVALUATED = ("eval.interval=null", "eval.at_end=false")


def train(out, *overrides):
    cfg = composed(*RUN, *overrides, f"output_dir={out}")
    if cfg.backend == "cpu":
        backend = select_backend("cpu", cpu_devices=1)
    else:
        backend = select_backend("xla", cpu_devices=4)
    summary = run_training(cfg, backend, out, {})
    return read_jsonl(out / "metrics.jsonl"), summary


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    cpu = ("backend=cpu", "ici_mesh.fsdp=1")
    with_eval = train(
        tmp_path_factory.mktemp("cpu_eval"),
        *cpu,
        *EVALUATED,
        "trainer.export_hf=true",
        "eval.samples=[def]",
        "eval.sample_tokens=12",
    )
    without = train(tmp_path_factory.mktemp("cpu_plain"), *cpu, *NOT_EVALUATED)
    return with_eval, without


@pytest.fixture(scope="module")
def xla_runs(tmp_path_factory):
    # The guard set to fail: a compilation after warm-up other than the evaluation's first
    # graph stops the run.
    guarded = ("backend=xla", "trainer.fail_on_recompile=true")
    with_eval = train(tmp_path_factory.mktemp("xla_eval"), *guarded, *EVALUATED)
    without = train(tmp_path_factory.mktemp("xla_plain"), *guarded, *NOT_EVALUATED)
    return with_eval, without


def evals(records):
    return {r["step"]: r for r in records if "eval_loss" in r}


def test_evaluations_are_logged_with_their_step_and_summarized(cpu_runs):
    (records, summary), _ = cpu_runs
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one record a step
    taken = evals(records)
    assert sorted(taken) == [2, 4, 6]
    for r in taken.values():
        assert r["eval_ppl"] == pytest.approx(2.718281828 ** r["eval_loss"])
        assert r["eval_tokens"] == 3 * 4 * 63  # 3 batches of 4 rows, 63 labelled tokens a row
        assert "loss" in r  # the step's own record
    assert taken[6]["eval_loss"] < taken[2]["eval_loss"]
    best = min(taken.values(), key=lambda r: r["eval_loss"])
    assert summary.eval_last == (6, taken[6]["eval_loss"])
    assert summary.eval_best == (best["step"], best["eval_loss"])


def test_training_losses_are_bit_identical_with_and_without_evaluation(cpu_runs):
    (with_eval, _), (without, _) = cpu_runs
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in without]
    assert not evals(without)


@requires_xla
def test_xla_training_is_bit_identical_with_evaluation_and_compiles_it_once(xla_runs):
    (with_eval, summary), (without, _) = xla_runs
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in without]
    # The first evaluation (after step 2) may compile its graph (the guard allows that one;
    # a record's count is taken before its step's evaluation); the later evaluations and the
    # steps between compile nothing more, the one after the last step included. (The count
    # is the process's: graphs an earlier run of this process compiled are reused.)
    counts = [r["compiles"] for r in with_eval]
    assert counts[2:] == [counts[2]] * (STEPS - 2)
    assert summary.compiles == counts[-1]


@requires_xla
def test_eval_loss_is_the_same_on_cpu_and_on_xla_with_4_devices(cpu_runs, xla_runs):
    cpu, xla = evals(cpu_runs[0][0]), evals(xla_runs[0][0])
    for step in (2, 4, 6):
        assert xla[step]["eval_loss"] == pytest.approx(cpu[step]["eval_loss"], abs=1e-4)
        assert xla[step]["eval_tokens"] == cpu[step]["eval_tokens"]


def test_eval_loss_does_not_depend_on_how_the_rows_are_cut_into_batches():
    cfg = composed("data.block_size=64")
    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=1), MeshAxesConfig(), None)
    model = build_model(cfg.model, torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))

    def forward(batch):
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        return out.loss, {"num_tokens": (batch["labels"][:, 1:] != IGNORE_INDEX).sum()}

    results = []
    for rows, steps in ((8, 2), (4, 4), (2, 8)):  # the same 16 rows
        cfg.eval.steps = steps
        batches = cut_eval_batches(cfg.eval, cfg.data, ByteTokenizer(), rows)
        results.append(Evaluator(cfg.eval, batches, backend, mesh).evaluate(model, forward, 0))
    assert [r.tokens for r in results] == [16 * 63] * 3
    assert [r.loss for r in results] == pytest.approx([results[0].loss] * 3, abs=1e-6)
    assert model.training  # the mode it had


def eval_only(out, *overrides):
    cfg = composed(*RUN, "eval_only=true", *overrides, f"output_dir={out}")
    backend = select_backend("cpu" if cfg.backend == "cpu" else "xla", cpu_devices=4)
    result = run_eval_only(cfg, backend, out)
    assert json.loads((out / "eval.json").read_text())["eval_loss"] == result.loss
    return result


@requires_xla
def test_eval_only_evaluates_a_cpu_checkpoint_on_xla_with_4_devices(cpu_runs, tmp_path):
    (records, summary), _ = cpu_runs
    result = eval_only(tmp_path, "backend=xla", f"trainer.resume={summary.checkpoint}")
    assert result.step == STEPS
    assert result.loss == pytest.approx(evals(records)[STEPS]["eval_loss"], abs=1e-4)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing but eval.json


def test_eval_only_evaluates_an_hf_folder(cpu_runs, tmp_path):
    (records, summary), _ = cpu_runs
    result = eval_only(
        tmp_path, "backend=cpu", "ici_mesh.fsdp=1", f"model.pretrained_path={summary.hf_export}"
    )
    assert result.loss == pytest.approx(evals(records)[STEPS]["eval_loss"], abs=1e-6)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["model"] == str(summary.hf_export) and record["eval_tokens"] == 3 * 4 * 63


def test_eval_only_of_a_folder_that_is_no_checkpoint_names_it(tmp_path):
    folder = tmp_path / "not_a_checkpoint"
    folder.mkdir()
    with pytest.raises(ConfigError, match=f"trainer.resume={folder}: cannot evaluate"):
        eval_only(tmp_path, "backend=cpu", "ici_mesh.fsdp=1", f"trainer.resume={folder}")


def test_eval_only_needs_a_checkpoint_or_an_hf_folder():
    problems = composed("eval_only=true").problems()
    assert any(p.startswith("eval_only=true evaluates a checkpoint") for p in problems)


def test_generate_reads_a_runs_newest_checkpoint_as_its_hf_export(cpu_runs):
    (records, summary), _ = cpu_runs
    run_dir = summary.checkpoint.parent.parent
    args = ["--prompt", "def", "--max-new-tokens", "12"]
    from_checkpoint = generate_main([str(run_dir), *args])
    assert generate_main([str(summary.hf_export), *args]) == from_checkpoint
    # eval.samples: the same greedy continuation, logged with the last evaluation
    assert evals(records)[STEPS]["eval_samples"] == [{"prompt": "def", "text": from_checkpoint}]
