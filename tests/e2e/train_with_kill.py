"""`python tests/e2e/train_with_kill.py WRITE_STEP KILL_STEP [overrides...]`: train.py whose
background checkpoint write of step WRITE_STEP never finishes (its DCP writer blocks), and
which kills itself with SIGKILL when step KILL_STEP begins: a crash in the middle of an
asynchronous save, at a moment chosen deterministically. KILL_STEP 0 kills the process inside
the write of WRITE_STEP instead, once its tensor files are on disk and before DCP's metadata
and the COMPLETE marker: a crash in the middle of a synchronous save. The block and the kill
come from this script (a patched DCP writer, a step callback), not from hooks inside the
trainer."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.distributed.checkpoint import FileSystemWriter  # noqa: E402

from run.launch import launch  # noqa: E402
from train_config import register_schema  # noqa: E402
from trainers.callbacks import Callback  # noqa: E402

WRITE_STEP = int(sys.argv.pop(1))
KILL_STEP = int(sys.argv.pop(1))
write_data = FileSystemWriter.write_data


def blocked_write_data(self, plan, planner):
    if f"step_{WRITE_STEP:08d}" not in str(self.path):
        return write_data(self, plan, planner)
    if KILL_STEP == 0:
        write_data(self, plan, planner).wait()
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Event().wait()  # forever: the kill comes first


FileSystemWriter.write_data = blocked_write_data


class KillAt(Callback):
    def step_begins(self, step: int) -> None:
        if step == KILL_STEP:
            os.kill(os.getpid(), signal.SIGKILL)


register_schema()


@hydra.main(config_path=str(ROOT / "configs"), config_name="default", version_base=None)
def main(raw: DictConfig) -> None:
    sys.exit(launch(raw, callbacks=[KillAt()]))


if __name__ == "__main__":
    main()
