"""What `python train.py` does with a composed config: a plan, a dry run, or a training run,
and the exit status (0 done, 1 the run failed, 2 the config has problems)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from run.preflight import Devices, plan_report, preflight
from torchprime.backend import select_backend
from torchprime.errors import ConfigError
from train_config import TrainConfig, mesh_size
from trainers.base_trainer import TrainingError
from trainers.callbacks import StepCallback
from trainers.hosts import is_coordinator
from trainers.metrics_logger import format_summary
from trainers.profiling import hlo_dir
from trainers.storage import WriteFailed


def launch(raw: DictConfig, callbacks: Sequence[StepCallback] = ()) -> int:
    """Run the config Hydra composed; `callbacks` watch the training steps."""
    cfg: TrainConfig = OmegaConf.to_object(raw)
    # A log line that cannot be written (train.log on a full disk) must not print a traceback
    # of its own over the run's message; the console handler still shows every line.
    logging.raiseExceptions = False
    if cfg.plan_only:
        pre = preflight(cfg, Devices.of_target(cfg.target), open_data=False)
        print(plan_report(pre))
        return 0 if pre.ok else 2
    if cfg.dry_run:
        from run.dry_run import dry_run

        return dry_run(cfg)
    try:
        from run.training import run_training

        output_dir = Path(cfg.output_dir)
        try:
            backend = select_backend(
                cfg.backend,
                cpu_devices=cfg.cpu_devices or mesh_size(cfg) or 1,
                hlo_dump_dir=hlo_dir(output_dir) / "xla" if cfg.debug.dump_hlo else None,
            )
        except ConfigError as e:  # no devices to check against: the config's own problems
            found = cfg.problems()
            found.insert(0, str(e))
            found.raise_if_any()
        if not is_coordinator():
            # One process per device: the coordinator speaks for the run; the others only
            # warn (their errors still print).
            logging.getLogger().setLevel(logging.WARNING)
        if cfg.eval_only:
            from run.evaluation import format_eval, run_eval_only

            result = run_eval_only(cfg, backend, output_dir)
            if is_coordinator():
                print(format_eval(result, output_dir))
            return 0
        resolved = OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
        summary = run_training(cfg, backend, output_dir, resolved, callbacks)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, WriteFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if is_coordinator():
        print(format_summary(summary))
    return 0
