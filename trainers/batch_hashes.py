"""A hash of every row the data pipeline produces (`debug.batch_hashes`), to check that two
runs (another host count, a resume) trained on the same rows without comparing the rows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def row_hashes(batch: dict[str, torch.Tensor]) -> list[str]:
    """A 16-hex-digit hash of each row of `batch`: every tensor's row, by key."""
    keys = sorted(batch)
    rows = next(iter(batch.values())).shape[0]
    found = []
    for i in range(rows):
        h = hashlib.blake2b(digest_size=8)
        for k in keys:
            h.update(k.encode())
            h.update(batch[k][i].contiguous().numpy().tobytes())
        found.append(h.hexdigest())
    return found


def hash_file(output_dir: Path, host: int) -> Path:
    return output_dir / "batch_hashes" / f"host_{host:05d}.jsonl"


class HashedBatches:
    """The host's batch stream, unchanged, writing each batch's row hashes as it is produced.
    The batch number is the pipeline's count of batches since the start of training (resumed
    runs go on counting); state_dict / load_state_dict are the pipeline's."""

    def __init__(self, batches: Any, path: Path):
        self.batches = batches
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def skipped_rows(self) -> int:
        return getattr(self.batches, "skipped_rows", 0)

    def state_dict(self) -> Any:
        return self.batches.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.batches.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        with self.path.open("a") as f:
            for batch in self.batches:
                record = {"batch": self.batches.batches, "rows": row_hashes(batch)}
                f.write(json.dumps(record) + "\n")
                f.flush()
                yield batch
