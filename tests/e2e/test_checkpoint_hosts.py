"""Checkpoints written by several hosts at once: one process per host, coordinated through a
torch.distributed process group (gloo here, as on a pod), into one shared folder, synchronously
and in the background (trainers/async_checkpoint.py), and a background write that fails on one
host is reported by every host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from conftest import ROOT

WORKER = r"""
import errno, json, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torchprime.backend import select_backend
from trainers.async_checkpoint import AsyncSaver
from trainers.checkpoint import load_checkpoint, save_checkpoint, step_dirs
from trainers.hosts import any_host

dist.init_process_group("gloo")
rank, top = dist.get_rank(), Path(sys.argv[1])
backend = select_backend("cpu", cpu_devices=1)
weights = torch.arange(12.0).reshape(3, 4)
saver = AsyncSaver(top / "async", backend, keep=1)  # its gloo group: made by every host


def state(step):
    return {"model": {"w": weights * step}, "counters": {"step": torch.tensor(float(step))}}


def run(mode):
    root = top / mode
    for step in (5, 10):
        host = {"rank": rank, "batches_consumed": step + rank}
        if mode == "sync":
            save_checkpoint(root, step, state(step), backend, host, keep=1)
        else:
            saver.save(step, state(step), host)  # written while the next step would run
    if mode == "async":
        saver.wait()
    fresh = {"model": {"w": torch.zeros(3, 4)}, "counters": {"step": torch.tensor(0.0)}}
    record = load_checkpoint(step_dirs(root)[0], fresh, backend)
    return {"record": record, "w_ok": bool(torch.equal(fresh["model"]["w"], weights * 10)),
            "step": fresh["counters"]["step"].item(), "dirs": [p.name for p in step_dirs(root)]}


result = {"rank": rank, "sync": run("sync"), "async": run("async")}
result["agree"] = [any_host(False), any_host(rank == 1)]  # a SIGTERM seen by host 1 only
# Host 1's disk fills during a background write: every host hears of it at its next wait.
write_data = FileSystemWriter.write_data
def full_disk(self, plan, planner):
    raise OSError(errno.ENOSPC, "No space left on device")
if rank == 1:
    FileSystemWriter.write_data = full_disk
saver.save(15, state(15), {"rank": rank})
try:
    saver.wait()
    result["failed"] = None
except BaseException as e:
    result["failed"] = f"{type(e).__name__}: {e}"
FileSystemWriter.write_data = write_data
dist.barrier()
result["after_failure"] = sorted(p.name for p in (top / "async").iterdir())
print(json.dumps(result))
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_write_one_checkpoint_and_each_reads_back_its_own_record(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path)],
            cwd=ROOT,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = sorted(
        (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs), key=lambda r: r["rank"]
    )
    for rank, r in enumerate(results):
        for mode in ("sync", "async"):
            got = r[mode]
            assert got["w_ok"] and got["step"] == 10.0, mode
            assert got["record"] == {"step": 10, "rank": rank, "batches_consumed": 10 + rank}
            assert got["dirs"] == ["step_00000010"], mode  # keep=1 pruned step 5, once
        assert r["agree"] == [False, True]  # both hosts stop when one received the signal
        # the failed background write: named on both hosts, no folder left, step 10 kept
        assert r["failed"] and "step 15" in r["failed"], r["failed"]
        assert r["after_failure"] == ["step_00000010"]
    assert "No space left" in results[1]["failed"] or "host 1" in results[0]["failed"]
    for mode in ("sync", "async"):
        folder = tmp_path / mode / "step_00000010"
        assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".distcp")) == [
            ".metadata",
            "COMPLETE",
            "host_00000.json",
            "host_00001.json",
        ]
        assert not [p for p in (tmp_path / mode).iterdir() if p.name.endswith(".tmp")]
