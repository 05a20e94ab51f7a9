"""What a checkpoint save costs the step loop, synchronous against asynchronous
(`trainer.checkpoint.async_save`), on the default run (XLA SPMD, 4 virtual CPU devices, fsdp=4,
the tiny model) with a checkpoint every 10 steps.

    python -m bench.checkpoint_save [--steps 25] [--rounds 2]

Each round runs both sides one after the other (interleaved: the machine is shared), as their
commands would. The cost of the saves is the loop time they add: the sum of the step times
metrics.jsonl records after the first two steps (compilation), minus as many times the median
step time of the steps that neither save nor follow a save; per save, divided by the saves
(steps 10 and 20 of 25; no save at the end). The losses of both sides are compared too.
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
INTERVAL = 10


def run_side(async_save: bool, steps: int, folder: Path) -> tuple[float, float, list[float]]:
    """(loop seconds the saves added per save, median plain step s, losses) of one run."""
    out = folder / ("async" if async_save else "sync")
    overrides = [
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint.interval={INTERVAL}",
        "trainer.checkpoint.save_at_end=false",
        f"trainer.checkpoint.async_save={str(async_save).lower()}",
        "trainer.logging_steps=1",
        "trainer.progress_bar=false",
        f"output_dir={out}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True
    )
    if proc.returncode:
        raise SystemExit(f"async_save={async_save} failed:\n{proc.stderr.decode()[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > WARMUP_STEPS]
    saves = [s for s in range(INTERVAL, steps + 1, INTERVAL)]
    near = {s + d for s in saves for d in (0, 1)}
    plain = statistics.median(r["step_time_s"] for r in timed if r["step"] not in near)
    added = sum(r["step_time_s"] for r in timed) - plain * len(timed)
    return added / len(saves), plain, [r["loss"] for r in records]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cost: dict[bool, list[float]] = {False: [], True: []}
    step: dict[bool, list[float]] = {False: [], True: []}
    gap = 0.0
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            losses = {}
            for async_save in (False, True):
                added, plain, losses[async_save] = run_side(async_save, args.steps, Path(tmp))
                cost[async_save].append(added)
                step[async_save].append(plain)
            gap = max(gap, max(abs(a - b) for a, b in zip(losses[False], losses[True])))
    sync_s, async_s = statistics.median(cost[False]), statistics.median(cost[True])
    result = {
        "steps": args.steps,
        "rounds": args.rounds,
        "interval": INTERVAL,
        "sync_save_s": sync_s,
        "async_save_s": async_s,
        "sync_runs_s": cost[False],
        "async_runs_s": cost[True],
        "step_s": statistics.median(step[False] + step[True]),
        "max_loss_gap": gap,
        "load_average": os.getloadavg()[0],
    }
    print(
        f"loop time a save adds: sync {sync_s:.3f} s, async {async_s:.3f} s "
        f"(runs: sync {', '.join(f'{c:.3f}' for c in cost[False])}; async "
        f"{', '.join(f'{c:.3f}' for c in cost[True])}); plain step {result['step_s']:.3f} s; "
        f"largest loss difference {gap:.1e}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
