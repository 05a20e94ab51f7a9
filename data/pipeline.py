"""The host's batch stream: logical shards, each sources → mixture → shuffle → tokenizer →
packing, interleaved into the host's rows of every global batch → collator, without end, with a
position that can be saved and restored exactly, on any host count."""

from __future__ import annotations

import copy
import logging
import math
import weakref
from dataclasses import asdict
from typing import Any

import torch

from collators import get_collator
from data.config import DataConfig, SourceConfig
from data.holdout import Holdout
from data.mixture import Mixture
from data.packing import Row, build_packer
from data.shuffle import ShuffleBuffer
from data.sources import SourceReader, describe, open_source, source_specs
from data.tokenizers import Tokenizer
from torchprime.errors import ConfigError

log = logging.getLogger(__name__)

#: 2: one position per logical shard (1, before them: one per host, refused or migrated).
STATE_VERSION = 2


def shard_layout(
    logical_shards: int | None, global_rows: int, hosts: int, micro_batches: int = 1
) -> tuple[int, int]:
    """(shards, rows each shard gives a step's global batch of `global_rows` rows), checked:
    the rows split evenly over the shards, and the shards over the hosts' parts of the
    micro-batches (each part of a micro-batch is whole shards)."""
    shards = logical_shards or global_rows
    parts = hosts * micro_batches
    if shards % parts:
        over = f"the {hosts} hosts" if hosts > 1 else ""
        if micro_batches > 1:
            over += (" x " if over else "the ") + (
                f"{micro_batches} micro-batches (trainer.grad_accum_steps)"
            )
        raise ConfigError(
            f"data.logical_shards={shards} does not split over {over}: each host reads whole "
            f"shards for its rows of each micro-batch, so it must be a multiple of {parts} (and "
            f"at least {parts})."
        )
    if global_rows % shards:
        raise ConfigError(
            f"data.logical_shards={shards}: a global batch of {global_rows} rows "
            "(trainer.global_batch_size) takes the same number of rows from every shard, so "
            f"its rows must be a multiple of the shards: choose a divisor of {global_rows}"
            + (f" that {parts} divides" if parts > 1 else "")
            + ", or null (one shard a row)."
        )
    return shards, global_rows // shards


class ShardStream:
    """One logical shard's rows, without end: its part of every source, its own mixture order,
    shuffle buffer and packer, all seeded with (seed, shard)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        specs: list[tuple[str, SourceConfig]],
        shard: int,
        shards: int,
        seed: int,
        holdout: Holdout | None,
        opened: list[tuple[list[str], Any]],
        scan_files: bool = True,
    ):
        """`opened`: each source's (files, stream), opened once for the host's shards;
        `scan_files`: check the first rows of every file (once a host is enough)."""
        self.cfg = cfg
        self.shard = shard
        self.tokenizer = tokenizer
        self.packer = build_packer(cfg.packing, cfg.block_size, tokenizer.pad_id)
        self.readers = [
            SourceReader(
                s,
                k,
                shard,
                shards,
                holdout,
                cfg.on_bad_row,
                cfg.max_bad_rows,
                cfg.max_doc_chars,
                source,
            )
            for (k, s), source in zip(specs, opened)
        ]
        for reader in self.readers:  # a missing field or an empty part fails now
            reader.check(scan_files)
        # Close the open files when the pipeline goes away, or at exit before the modules are
        # torn down (a stream generator closed during teardown prints spurious errors).
        weakref.finalize(self, _close_all, self.readers)
        weights = [s.weight for _, s in specs]
        self.mixture = Mixture(weights, seed, shard) if len(specs) > 1 else None
        buffer = math.ceil(cfg.shuffle_buffer / shards)
        self.shuffle = ShuffleBuffer(buffer, seed, shard) if buffer else None
        self._bos = [tokenizer.bos_id] if cfg.add_bos else []
        # pad packing keeps a row's worth of each document: tokenize no more than that
        self._max_tokens = cfg.block_size - len(self._bos) if cfg.packing == "pad" else None
        self._rows = 0
        # Rows made when each source's current pass began, to tell a source too small for one
        # row; None while unknown (a pass begun before a restore or while the shuffle buffer
        # was filling, which reads ahead).
        self._pass_start_rows: list[int | None] = [
            0 if self.shuffle is None else None for _ in self.readers
        ]

    def _next_text(self) -> str:
        i = self.mixture.next() if self.mixture is not None else 0
        reader = self.readers[i]
        epoch = reader.epoch
        text = reader.next_text()
        if reader.epoch != epoch:  # the source ran out and began its next pass
            start = self._pass_start_rows[i]
            if start is not None and start == self._rows:
                raise ConfigError(
                    f"{reader.key}: {reader.part()} gives less than one row of "
                    f"data.block_size={self.cfg.block_size} tokens per pass"
                    + ("; lower data.logical_shards" if reader.shards > 1 else "")
                    + "."
                )
            full = self.shuffle is None or self.shuffle.full
            self._pass_start_rows[i] = self._rows if full else None
        return text

    def _next_doc(self) -> list[int]:
        text = self.shuffle.next(self._next_text) if self.shuffle is not None else self._next_text()
        ids = self._bos + self.tokenizer.encode(text, self._max_tokens)
        ids.append(self.tokenizer.eos_id)
        return ids

    def next_row(self) -> Row:
        row = self.packer.next_row(self._next_doc)
        self._rows += 1
        return row

    def state(self) -> dict[str, Any]:
        """{"sources": [{"epoch", "docs", "rows", "stream" (the datasets state), "pieces" (the
        current row's pieces still to come)}, ...], "mixture": {"block", "offset"} | null,
        "shuffle": {"rng", "items"} | null, "packing": {"pieces": [[token ids], ...], "head"} |
        {}}. The packer's pieces are shared tuples (never changed); everything else a copy."""
        return {
            "sources": [r.state() for r in self.readers],
            "mixture": self.mixture.state() if self.mixture is not None else None,
            "shuffle": self.shuffle.state() if self.shuffle is not None else None,
            "packing": self.packer.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for reader, s in zip(self.readers, state["sources"]):
            reader.load_state(s)
        if self.mixture is not None:
            self.mixture.load_state(state["mixture"])
        if self.shuffle is not None:
            self.shuffle.load_state(state["shuffle"])
        self.packer.load_state(state["packing"])
        self._pass_start_rows = [None for _ in self.readers]


class TextBatches:
    """This host's rows of every global micro-batch, without end: a source that runs out starts
    its next pass on its own.

    The rows come from `data.logical_shards` streams (ShardStream). Row j of a step's global
    batch of G = batch_size x process_count x micro_batches rows is the next row of shard
    j // (G / shards); micro-batch m holds rows [m x G / micro_batches, (m + 1) x ...), and
    host h of each micro-batch its h-th block of batch_size rows (the device loaders place them
    so). A host therefore reads whole shards: it opens, reads and tokenizes only those. The
    rows of every step are the same on any host count and with any micro-batch split.

    Iterating yields dicts of int64 [batch_size, block_size] tensors (collators/). The object
    is its own iterator: `iter()` continues where the last batch left off.

    `state_dict()` is the position after the last batch yielded: that of each of this host's
    shards. `load_state_dict` takes the positions saved by every host of the run, on any host
    count, and puts each of this host's shards where it was; the batches that follow are the
    ones the saved run would have yielded, element for element. A device loader that reads
    ahead (torch_xla's MpDeviceLoader prefetches) runs the pipeline ahead of training: take
    the state after each batch as it is produced and keep the one of the last batch trained on
    (trainers/data_position.py does). That is why `state_dict()` is cheap (tens of
    microseconds a shard, plus a copy of the shuffle buffers' lists) and never aliases what
    the pipeline changes later.

    Resume cost: the sources' positions are restored by `datasets` (files before the current
    one are not read; the current file or shard is read again up to the saved example), the
    rest from the state itself. The state holds the shuffle buffers' documents, the pieces
    still to come of each source's current document (data.max_doc_chars), and the tokens the
    packers hold (less than a row plus the rest of the current document, a shard): its size
    grows with data.shuffle_buffer, the shards and the length of documents.
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
        micro_batches: int = 1,
    ):
        """`batch_size`: this host's rows of a global micro-batch; `holdout`: read only one side
        of the held-out split (data/holdout.py); `key`: the config key naming the sources in
        messages; `micro_batches`: of a step (trainer.grad_accum_steps)."""
        self.cfg = cfg
        self.batch_size = batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.micro_batches = micro_batches
        self.shards, self.rows_per_shard = shard_layout(
            cfg.logical_shards,
            batch_size * process_count * micro_batches,
            process_count,
            micro_batches,
        )
        # This host's shards for each micro-batch of a step: whole blocks of rows_per_shard.
        micro_rows, per_part = batch_size * process_count, batch_size // self.rows_per_shard
        self.parts = [
            range(first, first + per_part)
            for m in range(micro_batches)
            for first in [(m * micro_rows + process_index * batch_size) // self.rows_per_shard]
        ]
        self.collate = get_collator(cfg.collator)
        specs = source_specs(cfg, key)
        opened = [open_source(s, k) for k, s in specs]
        mine = [k for part in self.parts for k in part]
        self.streams = {
            k: ShardStream(
                cfg, tokenizer, specs, k, self.shards, seed, holdout, opened, k == mine[0]
            )
            for k in mine
        }
        self.micro = 0
        """The micro-batch of the step the next batch is (0 at a step's start)."""
        self.batches = 0
        """Batches yielded since the start of training (a restored count included)."""
        self._config = {
            "sources": [asdict(s) for _, s in specs],
            "seed": seed,
            "logical_shards": self.shards,
            "tokenizer": cfg.tokenizer,
            "add_bos": cfg.add_bos,
            "block_size": cfg.block_size,
            "packing": cfg.packing,
            "shuffle_buffer": cfg.shuffle_buffer,
            "max_doc_chars": cfg.max_doc_chars,
            "holdout": asdict(holdout) if holdout is not None else None,
        }
        log.info(
            "%s: %s%s; %s packing of %d tokens, shuffle buffer %d; logical shards %s of %d "
            "(%d rows each a step) on host %d of %d",
            key,
            ", ".join(f"{describe(s)} (weight {s.weight:g})" for _, s in specs),
            f", {holdout.describe()}" if holdout is not None else "",
            cfg.packing,
            cfg.block_size,
            cfg.shuffle_buffer,
            ", ".join(f"{part[0]}-{part[-1]}" for part in self.parts),
            self.shards,
            self.rows_per_shard,
            process_index,
            process_count,
        )

    @property
    def readers(self) -> list[SourceReader]:
        """Every source reader of this host's shards."""
        return [r for stream in self.streams.values() for r in stream.readers]

    # -- the stream ---------------------------------------------------------------------------
    def __iter__(self) -> TextBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        part = self.parts[self.micro]
        rows = [self.streams[k].next_row() for k in part for _ in range(self.rows_per_shard)]
        batch = self.collate(rows)
        self.batches += 1
        self.micro = (self.micro + 1) % self.micro_batches
        return batch

    @property
    def skipped_rows(self) -> int:
        """Rows without text left out so far (data.on_bad_row=skip), every source and shard."""
        return sum(reader.skipped for reader in self.readers)

    @property
    def epoch(self) -> int:
        """Passes every source has completed in every shard of this host."""
        return min(r.epoch for r in self.readers)

    def close(self) -> None:
        """Close the sources' open files (reading can go on later from the same position)."""
        _close_all(self.readers)

    # -- the position -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded, as JSON data: {"version", "config" (what
        must match on load), "batches" (yielded since the start of training), "micro" (the
        micro-batch of the step the next batch is: 0 between steps), "epoch",
        "shards": {"k": ShardStream.state(), ...} (this host's shards)}."""
        shards = {str(k): s.state() for k, s in self.streams.items()}
        return {
            "version": STATE_VERSION,
            "config": copy.deepcopy(self._config),
            "batches": self.batches,
            "micro": self.micro,
            "epoch": self.epoch,
            "shards": shards,
        }

    def load_state_dict(self, states: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from the positions `states` (one state, or those saved by every host of
        the run): each of this host's shards from the state that holds it."""
        states = [states] if isinstance(states, dict) else list(states)
        states = [migrate_v1(s, self._config) for s in states]
        for state in states:
            self._check_config(state["config"])
        counts = {s["batches"] for s in states}
        if len(counts) > 1:
            raise ConfigError(
                f"data state: the hosts saved different batch counts ({sorted(counts)}); the "
                "checkpoint mixes runs."
            )
        found = {k: v for s in states for k, v in s["shards"].items()}
        missing = [str(k) for k in self.streams if str(k) not in found]
        if missing:
            raise ConfigError(
                f"data state: no saved position for logical shards {', '.join(missing)} of "
                f"{self.shards} (the checkpoint holds {len(found)}); a host's record "
                "(host_NNNNN.json) is missing from the checkpoint."
            )
        micro = {s.get("micro", 0) for s in states}
        if micro != {0}:  # checkpoints are taken between steps
            raise ConfigError(
                f"data state: saved inside a step (micro-batch {sorted(micro)}); resume from a "
                "checkpoint."
            )
        for k, stream in self.streams.items():
            stream.load_state(found[str(k)])
        self.batches = counts.pop()
        self.micro = 0

    def _check_config(self, saved: dict[str, Any]) -> None:
        for key, now in self._config.items():
            if saved.get(key) != now:
                name = {"seed": "seed", "holdout": "eval.holdout"}.get(key, f"data.{key}")
                hint = "a saved data position only fits the same data config and seed"
                if key == "logical_shards":
                    hint = (
                        f"set data.logical_shards={saved.get(key)} to resume it (null means "
                        "trainer.global_batch_size, which may have changed)"
                    )
                raise ConfigError(
                    f"data state: saved with {name}={saved.get(key)!r}, this run has {now!r}; "
                    f"{hint}."
                )


def migrate_v1(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A version 2 state from `state`. Version 1 (before logical shards: one stream a host) of
    a single-host run is logical shard 0 of data.logical_shards=1, exactly (the same seeds, the
    same source split); from several hosts it cannot be placed in shards."""
    version = state.get("version")
    if version == STATE_VERSION:
        return state
    if version != 1:
        raise ConfigError(
            f"data state: version {version!r}, this code reads versions 1 and {STATE_VERSION}."
        )
    saved = state["config"]
    hosts = saved.get("process_count")
    if hosts == 1 and config["logical_shards"] == 1:
        shard = {k: state[k] for k in ("sources", "mixture", "shuffle", "packing")}
        rest = {k: v for k, v in saved.items() if not k.startswith("process")}
        return {
            "version": STATE_VERSION,
            "config": {**rest, "logical_shards": 1},
            "batches": state["batches"],
            "epoch": state["epoch"],
            "shards": {"0": shard},
        }
    if hosts == 1:
        raise ConfigError(
            "data state: this checkpoint was written before logical shards (data state version "
            "1) by one host; its data position is that of one stream: resume it with "
            "data.logical_shards=1 (on one host) to continue exactly where it stopped."
        )
    raise ConfigError(
        f"data state: this checkpoint was written before logical shards (data state version 1) "
        f"by {hosts} hosts, each reading its own stream; those positions cannot be placed in "
        f"logical shards. Finish that run with the code that wrote it on {hosts} hosts, or start "
        "a new run (from its weights: trainer.export_hf, then model.pretrained_path)."
    )


def _close_all(readers: list[SourceReader]) -> None:
    for reader in readers:
        reader.close()
