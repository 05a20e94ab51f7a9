"""eval_only=true: the held-out loss of a checkpoint (trainer.resume=FOLDER) or of an HF
folder (model.pretrained_path=DIR), on the run's devices and mesh, without training."""

from __future__ import annotations

import logging
from pathlib import Path

from run.preflight import Devices, preflight
from run.training import add_other_processes_problems, build_trainer
from torchprime.backend.base import Backend
from torchprime.errors import ConfigError
from train_config import TrainConfig
from trainers.checkpoint import CorruptCheckpoint, load_checkpoint
from trainers.evaluator import EvalResult, write_eval_json
from trainers.hosts import is_coordinator

log = logging.getLogger(__name__)


def run_eval_only(cfg: TrainConfig, backend: Backend, output_dir: Path) -> EvalResult:
    """Evaluate, write output_dir/eval.json (the coordinator) and return the result."""
    pre = preflight(cfg, Devices.of_backend(backend))
    add_other_processes_problems(pre)
    pre.raise_if_problems()
    trainer = build_trainer(pre, backend, output_dir, resolved={})
    step, source = 0, str(cfg.model.pretrained_path)
    if cfg.trainer.resume not in ("never", "auto"):
        path = Path(cfg.trainer.resume)
        try:
            # The model part only, per-layer names whether its weights are stacked or not.
            tensors = {"model": trainer.checkpoint_tensors()["model"]}
            record = load_checkpoint(path, tensors, backend)
            trainer.tensors_loaded(tensors)
        except CorruptCheckpoint as e:
            raise ConfigError(
                f"trainer.resume={path}: cannot evaluate this checkpoint: {e}."
            ) from None
        backend.sync()
        step, source = int(record["step"]), str(path)
    assert trainer.evaluator is not None  # the pre-flight cut the batches
    result = trainer.evaluator.evaluate(trainer.model, trainer.forward, step)
    trainer.metrics.log_eval(step, result.record())  # to wandb when enabled (no metrics.jsonl)
    trainer.metrics.close(failed=False)
    if is_coordinator():
        output_dir.mkdir(parents=True, exist_ok=True)
        batches = cfg.eval.steps
        write_eval_json(output_dir / "eval.json", result, source, {"eval_batches": batches})
        log.info("eval: %s at step %d: loss %.4f", source, step, result.loss)
    return result


def format_eval(result: EvalResult, output_dir: Path) -> str:
    """What an eval_only run prints."""
    return (
        f"\neval loss  {result.loss:.4f}  ppl {result.ppl:.2f}  ({result.tokens:,} tokens, "
        f"step {result.step})\nwritten to {output_dir / 'eval.json'}"
    )
