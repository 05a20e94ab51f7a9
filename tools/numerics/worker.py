"""One side of a comparison in a process of its own: `python -m tools.numerics.worker TASK OUT`.

TASK (written by tools/numerics/job.py) holds the side's overrides, the weights folder, the
batches and the options; OUT receives the side's description and its captured tensors. Exit
status 2 with an `error:` line for a problem of the user's to fix, as train.py does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tools.numerics.job import capture_side
from tools.numerics.sides import Side, compose_config
from torchprime.errors import ConfigError


def main(task_file: Path, out_file: Path) -> int:
    task = torch.load(task_file)
    try:
        overrides = task["overrides"]
        side = Side(task["label"], task["text"], overrides, task["hf"], compose_config(overrides))
        weights = Path(task["weights"]) if task["weights"] else None
        describe, captured = capture_side(side, weights, task["batches"], **task["options"])
    except ConfigError as e:
        where = "" if str(e).startswith("side ") else f"side {task['label']}: "
        print(f"error: {where}{e}", file=sys.stderr)
        return 2
    torch.save({"describe": describe, "captured": captured}, out_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
