"""`python tests/e2e/run_faults.py CASES.json RESULTS.json`: several `train.py` commands in one
process, for the fault-injection suite (tests/e2e/test_faults.py): one interpreter start and one
import of torch and datasets for all of them.

Each case is {"name", "args": [overrides], "before": [actions], "at_step": {N: [actions]}}.
An action is ["rm", PATH] (a file or a folder), ["write", PATH, TEXT] or ["run", ARGV...]; "at_step"
actions run when step N begins, from a step callback handed to the run (as
tests/e2e/train_with_sigterm.py does), never from a hook in the trainer. Each case runs the
Hydra entry point exactly as train.py does, with file descriptor 2 sent to a file, so whatever
the process would print (Hydra's tracebacks included) is what the case records, with its exit
status: file descriptors 1 and 2 go to files while it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

import hydra  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from run.launch import launch  # noqa: E402
from train_config import register_schema  # noqa: E402
from trainers.callbacks import Callback  # noqa: E402


def act(action: list[str]) -> None:
    kind, *args = action
    if kind == "rm":
        path = Path(args[0])
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    elif kind == "write":
        Path(args[0]).write_text(args[1])
    elif kind == "run":
        subprocess.run(args, check=True, capture_output=True)
    else:
        raise ValueError(f"unknown action {kind}")


class ActAt(Callback):
    def __init__(self, at_step: dict[str, list[list[str]]]):
        self.at_step = {int(k): v for k, v in at_step.items()}

    def step_begins(self, step: int) -> None:
        for action in self.at_step.get(step, []):
            act(action)


CALLBACKS: list[Callback] = []
register_schema()


@hydra.main(config_path=str(ROOT / "configs"), config_name="default", version_base=None)
def main(raw: DictConfig) -> None:
    sys.exit(launch(raw, callbacks=CALLBACKS))


def run_case(case: dict) -> dict:
    for action in case.get("before", []):
        act(action)
    CALLBACKS[:] = [ActAt(case.get("at_step", {}))]
    GlobalHydra.instance().clear()
    sys.argv = ["train.py", *case["args"]]
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        code = None
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {"name": case["name"], "code": code, "stdout": stdout, "stderr": stderr}


if __name__ == "__main__":
    spec, results = Path(sys.argv[1]), Path(sys.argv[2])  # run_case replaces sys.argv
    results.write_text(json.dumps([run_case(case) for case in json.loads(spec.read_text())]))
