"""Where evaluation results go: the evaluated step's metrics.jsonl record, wandb's eval/
section, the progress bar and the end-of-run summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import read_jsonl
from torchprime.backend import select_backend
from trainers.metrics_logger import MetricsLogger, TrainSummary, format_summary
from trainers.wandb_logger import wandb_key

TRAIN = {"loss": 3.0, "lr": 1e-3, "grad_norm": 1.0}
EVAL = {"eval_loss": 2.5, "eval_ppl": 12.18, "eval_tokens": 4032}


class Collect:
    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)

    def close(self, failed=False):
        pass


def test_an_evaluated_step_is_one_record_with_the_eval_fields(tmp_path):
    sink = Collect()
    logger = MetricsLogger(tmp_path / "metrics.jsonl", select_backend("cpu", 1), 64, sinks=[sink])
    logger.start(0, 3)
    logger.log(1, TRAIN)
    logger.log(2, TRAIN, hold=True)  # step 2 is evaluated next
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    logger.log_eval(2, EVAL, seconds=5.0)
    logger.log_eval(3, {**EVAL, "eval_loss": 2.4})  # a step that was not logged
    logger.close(failed=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == 3.0 and records[1]["eval_loss"] == 2.5
    assert records[2] == {"step": 3, **EVAL, "eval_loss": 2.4}
    assert sink.records == records


def test_a_held_record_is_written_even_when_no_evaluation_follows(tmp_path):
    logger = MetricsLogger(tmp_path / "metrics.jsonl", select_backend("cpu", 1), 64)
    logger.start(0, 1)
    logger.log(1, TRAIN, hold=True)
    logger.close(failed=True)
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 3.0


def test_wandb_gets_the_eval_fields_in_their_own_section():
    assert [wandb_key(k) for k in ("loss", "eval_loss", "eval_ppl", "eval_tokens")] == [
        "loss",
        "eval/loss",
        "eval/ppl",
        "eval/tokens",
    ]


def test_the_summary_prints_the_last_and_best_eval_loss():
    summary = TrainSummary(
        steps=300,
        max_steps=300,
        start_step=0,
        first_loss=5.6,
        last_loss=2.0,
        tokens_per_sec=4000.0,
        elapsed_s=100.0,
        compiles=3,
        metrics_path=Path("m.jsonl"),
        checkpoint=None,
        eval_best=(250, 2.2),
        eval_last=(300, 2.25),
    )
    assert "  eval loss     2.2500 (last, step 300); best 2.2000 at step 250" in (
        format_summary(summary).splitlines()
    )


def test_wandb_receives_eval_loss_ppl_and_the_samples_table(tmp_path):
    from e2e.test_resume import wandb_history

    from trainers.config import WandbConfig
    from trainers.wandb_logger import WandbLogger

    sink = WandbLogger(WandbConfig(enabled=True), "eval", tmp_path, {})
    sink.log({"step": 1, **TRAIN})
    sink.log({"step": 2, **TRAIN, **EVAL, "eval_samples": [{"prompt": "def", "text": " f():"}]})
    sink.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    # wandb's service process may still be writing the run's file on a loaded machine
    for _ in range(60):
        logged = wandb_history(run)
        if 2 in logged and list(run.glob("files/media/table/eval/samples_*.table.json")):
            break
        time.sleep(1)
    assert logged[2]["eval/loss"] == 2.5 and logged[2]["eval/ppl"] == 12.18
    assert logged[2]["eval/samples/_type"] == "table-file" and "eval/loss" not in logged[1]
    (table,) = run.glob("files/media/table/eval/samples_*.table.json")
    assert json.loads(table.read_text())["data"] == [["def", " f():"]]
