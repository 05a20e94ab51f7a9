"""`python tests/e2e/train_with_sigterm.py STEP [overrides...]`: train.py whose process sends
itself SIGTERM when step STEP begins, as a TPU preemption would in the middle of a step. The
signal comes from a step callback handed to the run, not from a hook inside the trainer. Under
torchrun, SIGTERM_RANK=R sends it to rank R only (every rank otherwise)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from run.launch import launch  # noqa: E402
from train_config import register_schema  # noqa: E402
from trainers.callbacks import Callback  # noqa: E402


class SigtermAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def step_begins(self, step: int) -> None:
        rank = os.environ.get("RANK", "0")
        if step == self.step and os.environ.get("SIGTERM_RANK", rank) == rank:
            os.kill(os.getpid(), signal.SIGTERM)


STEP = int(sys.argv.pop(1))
register_schema()


@hydra.main(config_path=str(ROOT / "configs"), config_name="default", version_base=None)
def main(raw: DictConfig) -> None:
    sys.exit(launch(raw, callbacks=[SigtermAt(STEP)]))


if __name__ == "__main__":
    main()
