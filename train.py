"""Pretrain a model: `python train.py [+config=NAME] [group=option] [key=value ...]`.

Hydra composes configs/default.yaml, the chosen groups and presets, and the command line on
top of the schema (train_config.py); run/launch.py takes it from there: the plan (plan_only),
the dry run (dry_run), or the run itself: pre-flight checks, assembly, training, the summary.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from run.launch import launch
from train_config import register_schema

register_schema()


@hydra.main(config_path="configs", config_name="default", version_base=None)
def main(raw: DictConfig) -> None:
    sys.exit(launch(raw))


if __name__ == "__main__":
    main()
