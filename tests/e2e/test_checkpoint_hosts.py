"""Checkpoints written by several hosts at once: one process per host, coordinated through a
torch.distributed process group (gloo here, as on a pod), into one shared folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from conftest import ROOT

WORKER = r"""
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from torchprime.backend import select_backend
from trainers.checkpoint import load_checkpoint, save_checkpoint, step_dirs
from trainers.hosts import any_host

dist.init_process_group("gloo")
rank, root = dist.get_rank(), Path(sys.argv[1])
backend = select_backend("cpu", cpu_devices=1)
weights = torch.arange(12.0).reshape(3, 4)
for step in (5, 10):
    state = {"model": {"w": weights * step}, "counters": {"step": torch.tensor(float(step))}}
    host = {"rank": rank, "batches_consumed": step + rank}
    save_checkpoint(root, step, state, backend, host, keep=1)
fresh = {"model": {"w": torch.zeros(3, 4)}, "counters": {"step": torch.tensor(0.0)}}
record = load_checkpoint(step_dirs(root)[0], fresh, backend)
agree = [any_host(False), any_host(rank == 1)]  # a SIGTERM seen by host 1 only
w_ok = bool(torch.equal(fresh["model"]["w"], weights * 10))
dirs = [p.name for p in step_dirs(root)]
step = fresh["counters"]["step"].item()
print(json.dumps({"rank": rank, "record": record, "agree": agree, "w_ok": w_ok, "step": step,
                  "dirs": dirs}))
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_write_one_checkpoint_and_each_reads_back_every_record(tmp_path):
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
        assert r["w_ok"] and r["step"] == 10.0
        hosts = [{"step": 10, "rank": i, "batches_consumed": 10 + i} for i in range(2)]
        assert r["record"] == {**hosts[rank], "hosts": hosts}  # every host's, for the data
        assert r["dirs"] == ["step_00000010"]  # keep=1 pruned step 5, once
        assert r["agree"] == [False, True]  # both hosts stop when one received the signal
    folder = tmp_path / "step_00000010"
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".distcp")) == [
        ".metadata",
        "COMPLETE",
        "host_00000.json",
        "host_00001.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
