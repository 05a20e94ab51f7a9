"""The host's batch stream: sources → mixture → shuffle → tokenizer → packing → collator,
without end, with a position that can be saved and restored exactly."""

from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import asdict
from typing import Any

import torch

from collators import get_collator
from data.config import DataConfig
from data.holdout import Holdout
from data.mixture import Mixture
from data.packing import build_packer
from data.shuffle import ShuffleBuffer
from data.sources import SourceReader, describe, source_specs
from data.tokenizers import Tokenizer
from torchprime.errors import ConfigError

log = logging.getLogger(__name__)

STATE_VERSION = 1


class TextBatches:
    """Batches of `batch_size` rows for this host, without end: a source that runs out starts
    its next pass on its own.

    Iterating yields dicts of int64 [batch_size, block_size] tensors (collators/). The object
    is its own iterator: `iter()` continues where the last batch left off.

    `state_dict()` is the position after the last batch yielded; `load_state_dict` puts a new
    pipeline (same data config, seed and host) there, and the batches that follow are the
    ones the saved pipeline would have yielded, element for element. A device loader that
    reads ahead (torch_xla's MpDeviceLoader prefetches) runs the pipeline ahead of training:
    take the state after each batch as it is produced and keep the one of the last batch
    trained on (trainers/data_position.py does). That is why `state_dict()` is cheap (tens
    of microseconds, plus a copy of the shuffle buffer's list) and never aliases what the
    pipeline changes later.

    Resume cost: the sources' positions are restored by `datasets` (files before the current
    one are not read; the current file or shard is read again up to the saved example), the
    rest from the state itself. The state holds the shuffle buffer's documents, the pieces
    still to come of each source's current document (data.max_doc_chars), and the
    tokens the packer holds (less than a row plus the rest of the current document): its
    size grows with data.shuffle_buffer and the length of documents.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        seed: int = 0,
        holdout: Holdout | None = None,
        key: str = "data",
    ):
        """`holdout`: read only one side of the held-out split (data/holdout.py); `key`: the
        config key naming the sources in messages."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.packer = build_packer(cfg.packing, cfg.block_size, tokenizer.pad_id)
        self.collate = get_collator(cfg.collator)
        specs = source_specs(cfg, key)
        self.readers = [
            SourceReader(
                s,
                k,
                process_index,
                process_count,
                holdout,
                cfg.on_bad_row,
                cfg.max_bad_rows,
                cfg.max_doc_chars,
            )
            for k, s in specs
        ]
        for reader in self.readers:  # a missing field or an empty part fails now
            reader.check()
        # Close the open files when the pipeline goes away, or at exit before the modules are
        # torn down (a stream generator closed during teardown prints spurious errors).
        weakref.finalize(self, _close_all, self.readers)
        self.mixture = Mixture([s.weight for _, s in specs], seed) if len(specs) > 1 else None
        self.shuffle = (
            ShuffleBuffer(cfg.shuffle_buffer, seed, process_index) if cfg.shuffle_buffer else None
        )
        self._bos = [tokenizer.bos_id] if cfg.add_bos else []
        # pad packing keeps a row's worth of each document: tokenize no more than that
        self._max_tokens = cfg.block_size - len(self._bos) if cfg.packing == "pad" else None
        self.batches = 0
        """Batches yielded since the start of training (a restored count included)."""
        self._rows = 0
        # Rows made when each source's current pass began, to tell a source too small for one
        # row; None while unknown (a pass begun before a restore or while the shuffle buffer
        # was filling, which reads ahead).
        self._pass_start_rows: list[int | None] = [
            0 if self.shuffle is None else None for _ in self.readers
        ]
        self._config = {
            "sources": [asdict(s) for _, s in specs],
            "seed": seed,
            "process_index": process_index,
            "process_count": process_count,
            "tokenizer": cfg.tokenizer,
            "add_bos": cfg.add_bos,
            "block_size": cfg.block_size,
            "packing": cfg.packing,
            "shuffle_buffer": cfg.shuffle_buffer,
            "max_doc_chars": cfg.max_doc_chars,
            "holdout": asdict(holdout) if holdout is not None else None,
        }
        log.info(
            "%s: %s%s; %s packing of %d tokens, shuffle buffer %d, host %d of %d",
            key,
            ", ".join(f"{describe(s)} (weight {s.weight:g})" for _, s in specs),
            f", {holdout.describe()}" if holdout is not None else "",
            cfg.packing,
            cfg.block_size,
            cfg.shuffle_buffer,
            process_index,
            process_count,
        )

    # -- the stream ---------------------------------------------------------------------------
    def _next_text(self) -> str:
        i = self.mixture.next() if self.mixture is not None else 0
        reader = self.readers[i]
        epoch = reader.epoch
        text = reader.next_text()
        if reader.epoch != epoch:  # the source ran out and began its next pass
            start = self._pass_start_rows[i]
            if start is not None and start == self._rows:
                raise ConfigError(
                    f"{reader.key}: {describe(reader.spec)} gives host {self.process_index} less "
                    f"than one row of data.block_size={self.cfg.block_size} tokens per pass."
                )
            full = self.shuffle is None or self.shuffle.full
            self._pass_start_rows[i] = self._rows if full else None
        return text

    def _next_doc(self) -> list[int]:
        text = self.shuffle.next(self._next_text) if self.shuffle is not None else self._next_text()
        ids = self._bos + self.tokenizer.encode(text, self._max_tokens)
        ids.append(self.tokenizer.eos_id)
        return ids

    def __iter__(self) -> TextBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            rows.append(self.packer.next_row(self._next_doc))
            self._rows += 1
        batch = self.collate(rows)
        self.batches += 1
        return batch

    @property
    def skipped_rows(self) -> int:
        """Rows without text left out so far (data.on_bad_row=skip), every source."""
        return sum(reader.skipped for reader in self.readers)

    @property
    def epoch(self) -> int:
        """Passes every source has completed on this host."""
        return min(r.epoch for r in self.readers)

    def close(self) -> None:
        """Close the sources' open files (reading can go on later from the same position)."""
        _close_all(self.readers)

    # -- the position -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded, as JSON data:
        {"version", "config" (what must match on load), "batches" (yielded since the start of
        training), "epoch", "sources": [{"epoch", "docs", "rows", "stream" (the datasets
        state), "pieces" (the current row's pieces still to come)}, ...], "mixture": {"block",
        "offset"} | null, "shuffle": {"rng", "items"} | null, "packing": {"pieces": [[token ids],
        ...], "head"} | {}}.
        The packer's pieces are shared tuples (never changed); everything else is a copy."""
        sources = [r.state() for r in self.readers]
        return {
            "version": STATE_VERSION,
            "config": copy.deepcopy(self._config),
            "batches": self.batches,
            "epoch": min(s["epoch"] for s in sources),
            "sources": sources,
            "mixture": self.mixture.state() if self.mixture is not None else None,
            "shuffle": self.shuffle.state() if self.shuffle is not None else None,
            "packing": self.packer.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"data state: version {state.get('version')!r}, this code reads version "
                f"{STATE_VERSION}."
            )
        saved = state["config"]
        for key, now in self._config.items():
            if saved.get(key) != now:
                name = {"seed": "seed", "holdout": "eval.holdout"}.get(key, f"data.{key}")
                if key.startswith("process"):
                    name = f"host {key}"
                raise ConfigError(
                    f"data state: saved with {name}={saved.get(key)!r}, this run has {now!r}; "
                    "a saved data position only fits the same data config, seed and host."
                )
        for reader, s in zip(self.readers, state["sources"]):
            reader.load_state(s)
        if self.mixture is not None:
            self.mixture.load_state(state["mixture"])
        if self.shuffle is not None:
            self.shuffle.load_state(state["shuffle"])
        self.packer.load_state(state["packing"])
        self.batches = state["batches"]
        self._pass_start_rows = [None for _ in self.readers]


def _close_all(readers: list[SourceReader]) -> None:
    for reader in readers:
        reader.close()
