"""Where metrics go (output_dir/metrics.jsonl, one JSON object a logged step) and what model
FLOPs utilization (mfu) is computed from."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from torchprime.chips import chip_of
from trainers.storage import WriteFailed, describe_write_failure


class MetricsFile:
    """Appends records to a JSON-lines file, flushed at once so a crash loses nothing logged.
    The file is created with the first record: a run that fails before it logged a step leaves
    no metrics.jsonl behind, so the same command may run again in the same folder."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        # JSON has no NaN / inf: write them as null rather than as invalid JSON.
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as e:
            # The records before this one are on disk; a line cut here is dropped on resume.
            raise WriteFailed(
                describe_write_failure(f"metrics of step {record.get('step')}", self.path, e)
                + ". The checkpoints are intact: make room, then run the same command with "
                "trainer.resume=auto to continue."
            ) from None

    def close(self) -> None:
        if self._file is not None:
            # Closing flushes what a failed write left in the buffer, and fails the same way.
            with contextlib.suppress(OSError):
                self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop the records of steps after `last_step` (a resumed run logs them again, from the
    checkpoint's state), and a last line cut by a crash; returns how many lines were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
    return dropped


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 × N + 12 × layers × hidden × seq_len.

    N counts the parameters that multiply activations: every parameter but the input
    embedding tables (a lookup; a tied LM head is counted, as the head's matmul), and of a
    mixture of experts only the share a token uses (`active_fraction`: k of E). 6 = 2 FLOPs
    per multiply-add × (forward + 2 × backward). The second term is attention's QKᵀ and AV,
    which have no parameters (PaLM, appendix B).
    """
    counted: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        active = getattr(module, "active_fraction", 1.0)
        for p in module.parameters(recurse=False):
            counted[id(p)] = p.numel() * active
    cfg = getattr(model, "config", None)
    attention = 0
    if cfg is not None and hasattr(cfg, "num_hidden_layers") and hasattr(cfg, "hidden_size"):
        attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    return 6.0 * sum(counted.values()) + attention


def peak_flops(device_kind: str, override: float | None) -> float | None:
    """Peak FLOP/s of one device: the config's value, else the chip table's, else None (no
    mfu)."""
    if override is not None:
        return override
    chip = chip_of(device_kind)
    return chip.peak_flops if chip else None
