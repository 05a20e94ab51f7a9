"""The torch.distributed engine's step on the CPU: the eager training step of the default tiny
run with 2 gloo processes (fsdp=2, one per "device", started by torchrun) beside the same run
in 1 process (backend=cpu, a one-device mesh).

    python -m bench.distributed_step [--steps 10] [--rounds 2]

Each round runs both sides, one after the other (interleaved: the machine is shared), as
their commands would; the step times are the ones metrics.jsonl records, after the first two
steps (start-up, allocator). Reported only: on two cores two processes split the same cores,
and gloo's collectives go through the loopback, so this measures the engine's overhead, not a
speed-up. The losses of both sides are compared too (they must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 2


def command(processes: int, steps: int, out: Path) -> list[str]:
    overrides = [
        "backend=cpu",
        f"ici_mesh.fsdp={processes}",
        f"trainer.max_steps={steps}",
        "trainer.logging_steps=1",
        "trainer.progress_bar=false",
        "trainer.checkpoint.save_at_end=false",
        f"output_dir={out}",
    ]
    if processes == 1:
        return [sys.executable, "train.py", *overrides]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [sys.executable, *launcher, "train.py", *overrides]


def run_side(processes: int, steps: int, folder: Path) -> tuple[list[float], list[float]]:
    """(step times after the warm-up, losses) of one run."""
    out = folder / f"p{processes}"
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    proc = subprocess.run(command(processes, steps, out), cwd=ROOT, env=env, capture_output=True)
    if proc.returncode:
        raise SystemExit(f"{processes} processes failed:\n{proc.stderr.decode()[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in records[WARMUP_STEPS:]], [r["loss"] for r in records]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    times: dict[int, list[float]] = {1: [], 2: []}
    gap = 0.0
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            losses = {}
            for processes in (1, 2):
                step_times, losses[processes] = run_side(processes, args.steps, Path(tmp))
                times[processes] += step_times
            gap = max(gap, max(abs(a - b) for a, b in zip(losses[1], losses[2])))
    one, two = statistics.median(times[1]), statistics.median(times[2])
    result = {
        "steps": args.steps,
        "rounds": args.rounds,
        "one_process_s": one,
        "two_processes_s": two,
        "ratio": two / one,
        "max_loss_gap": gap,
        "batch": "8 x 256",
        "load_average": os.getloadavg()[0],
    }
    print(
        f"1 process: {one:.3f} s/step; 2 processes (gloo, fsdp=2): {two:.3f} s/step "
        f"({two / one:.2f}x); largest loss difference {gap:.1e}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
