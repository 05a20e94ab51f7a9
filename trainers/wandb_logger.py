"""Metrics and the resolved config to Weights & Biases (the `wandb` config block).

The run id is kept in output_dir/wandb_run_id, so a resumed run continues the same wandb run
(resume="allow" with that id). Steps wandb already has, logged after the checkpoint by the run
that was interrupted, are logged again with the same values (resuming is exact) and wandb keeps
its first copy.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

from trainers.config import WandbConfig

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"


def wandb_key(name: str) -> str:
    """A metrics.jsonl field's wandb name: evaluation fields in their own section
    (eval_loss -> eval/loss, eval_ppl -> eval/ppl)."""
    return "eval/" + name.removeprefix("eval_") if name.startswith("eval_") else name


class WandbLogger:
    """One wandb run for the whole training run, resumed across restarts."""

    def __init__(self, cfg: WandbConfig, run_name: str, output_dir: Path, config: dict[str, Any]):
        import wandb

        id_file = output_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        directory = Path(cfg.dir) if cfg.dir else output_dir
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name or run_name,
            tags=list(cfg.tags),
            dir=str(directory),
            mode=str(cfg.mode),
            id=run_id,
            resume="allow",
            config=config,
        )
        log.info("wandb: run %s (%s), files in %s", run_id, cfg.mode, directory / "wandb")

    def log(self, record: dict[str, Any]) -> None:
        values = {wandb_key(k): v for k, v in record.items() if k != "step" and v is not None}
        if "eval/samples" in values:  # text: a table of prompts and their continuations
            import wandb

            rows = [[s["prompt"], s["text"]] for s in values["eval/samples"]]
            values["eval/samples"] = wandb.Table(columns=["prompt", "text"], data=rows)
        self.run.log(values, step=int(record["step"]))

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
