"""A run saved by 2 hosts resumes on 1 host and trains on exactly the rows, and to the losses,
of the uninterrupted run (data.logical_shards: the data order is independent of the host
count). Hosts are processes of `python train.py backend=cpu`, one device each, joined by a gloo
process group as hosts of a pod are; every run writes the row hashes of each batch
(debug.batch_hashes), compared with the default data config's single-host pipeline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from conftest import ROOT, composed, read_jsonl, run_train
from data.eval_batches import training_holdout
from data.pipeline import TextBatches
from data.tokenizers import ByteTokenizer
from trainers.batch_hashes import hash_file, row_hashes

STEPS = 6
SAVED = 3
RUN = (
    "backend=cpu",
    f"trainer.max_steps={STEPS}",
    "trainer.logging_steps=1",
    "trainer.progress_bar=false",
    "eval.interval=null",  # the held-out share is still left out of training
    "debug.batch_hashes=true",
)
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_hosts(*overrides: str) -> None:
    """`python train.py OVERRIDES` as 2 hosts of one device each (LOCAL_WORLD_SIZE=1)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="1",
        LOCAL_RANK="0",
        WANDB_MODE="offline",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "train.py", *overrides],
            cwd=ROOT,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]


def recorded(out, hosts: int) -> dict[int, list[str]]:
    """Row hashes of each global batch a run produced: its hosts' rows in host order (the last
    record of a batch counts)."""
    parts = [{} for _ in range(hosts)]
    for h in range(hosts):
        for r in read_jsonl(hash_file(out, h)):
            parts[h][r["batch"]] = r["rows"]
    return {n: sum((p[n] for p in parts), []) for n in parts[0] if all(n in p for p in parts)}


def single_host_reference(batches: int) -> list[list[str]]:
    """The global batches of the default data config, read by one pipeline on one host."""
    cfg = composed(*RUN)
    rows = cfg.trainer.global_batch_size
    pipeline = TextBatches(
        cfg.data, ByteTokenizer(), rows, 0, 1, cfg.seed, training_holdout(cfg.eval)
    )
    return [row_hashes(next(pipeline)) for _ in range(batches)]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}


def test_a_run_saved_by_two_hosts_resumes_on_one_with_the_same_rows_and_losses(tmp_path):
    two, one = tmp_path / "two_hosts", tmp_path / "one_host"
    two_hosts(*RUN, "ici_mesh.fsdp=2", f"trainer.checkpoint.interval={SAVED}", f"output_dir={two}")
    checkpoint = two / "checkpoints" / f"step_{SAVED:08d}"
    proc = run_train(*RUN, "ici_mesh.fsdp=1", f"trainer.resume={checkpoint}", f"output_dir={one}")
    assert proc.returncode == 0, proc.stderr[-4000:]

    reference = single_host_reference(STEPS)
    on_two, on_one = recorded(two, 2), recorded(one, 1)
    # every global batch of the 2-host run is the 1-host pipeline's, row for row ...
    assert [on_two[n] for n in range(1, STEPS + 1)] == reference
    # ... and the resumed 1-host run goes on with batches 4 to 6, and nothing before them
    assert min(on_one) == SAVED + 1
    assert [on_one[n] for n in range(SAVED + 1, STEPS + 1)] == reference[SAVED:]
    # the same rows give the same losses (sharding changes only the order of sums)
    a, b = losses(two), losses(one)
    assert sorted(b) == list(range(SAVED + 1, STEPS + 1))
    for step in b:
        assert abs(a[step] - b[step]) <= TOLERANCE * max(1.0, abs(a[step])), step
    assert torch.isfinite(torch.tensor(list(b.values()))).all()
