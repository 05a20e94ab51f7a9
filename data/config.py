"""Schema of the `data` config group (configs/data/). Each block says what is wrong with its
own values (`problems`); whether the sources open is checked by reading them (data/sources.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from data.packing import Packing
from torchprime.errors import Problems


class SourceKind(StrEnum):
    """Where documents come from."""

    stdlib = "stdlib"
    """The running Python's standard library sources, one document a file."""
    files = "files"
    """Local files at `path`."""
    hub = "hub"
    """An HF hub dataset named by `path`, streamed."""


class BadRowPolicy(StrEnum):
    """What a row without text does (a missing or null text field, a number where text was
    expected)."""

    error = "error"
    """Stop the run, naming the file and the row."""
    skip = "skip"
    """Leave the row out, log it with its file and row and count it (metrics.jsonl:
    skipped_rows), up to data.max_bad_rows."""


class FileFormat(StrEnum):
    """How local files are read (`source: files`)."""

    text = "text"
    """One document a file."""
    json = "json"
    """JSON lines, one document a row."""
    parquet = "parquet"
    """Parquet, one document a row."""


def source_problems(found: Problems, key: str, source: SourceKind, path: str | None) -> None:
    """A files or hub source needs a path."""
    if source == SourceKind.hub:
        found.check(
            bool(path), f"{key}.source=hub needs {key}.path, the dataset's name on the hub."
        )
    elif source == SourceKind.files:
        found.check(bool(path), f"{key}.source=files needs {key}.path (a file, folder or glob).")


@dataclass
class SourceConfig:
    """One source of a weighted mixture (an entry of `data.sources`)."""

    source: SourceKind = SourceKind.files
    """stdlib, files or hub, as the top-level `data.source`."""
    path: str | None = None
    """files: a file, a folder or a glob; hub: the dataset name."""
    format: FileFormat = FileFormat.text
    """files: text (one document a file), json (JSON lines) or parquet."""
    hub_config: str | None = None
    """hub: the dataset's configuration name."""
    split: str = "train"
    """hub: the split to read (local files and stdlib have one split)."""
    text_field: str = "text"
    """Field of each row that holds the text."""
    weight: float = 1.0
    """Share of the documents drawn from this source, relative to the other weights (they
    need not sum to 1)."""

    def problems(self, key: str) -> Problems:
        found = Problems()
        source_problems(found, key, self.source, self.path)
        found.check(
            math.isfinite(self.weight) and self.weight > 0,
            f"{key}.weight={self.weight}: must be a positive number.",
        )
        return found


@dataclass
class DataConfig:
    """Where text comes from and how it becomes fixed-size training rows."""

    source: SourceKind = SourceKind.stdlib
    """stdlib: the running Python's standard library sources, one document a file (no network,
    about 13 MB); files: local files at `path`; hub: the HF hub dataset named by `path`.
    Ignored when `sources` is not empty."""
    path: str | None = None
    """files: a file, a folder or a glob; hub: the dataset name (e.g. allenai/c4)."""
    format: FileFormat = FileFormat.text
    """files: text (one document a file), json (JSON lines) or parquet."""
    hub_config: str | None = None
    """hub: the dataset's configuration name (e.g. "en" for allenai/c4)."""
    split: str = "train"
    """hub: the split to read (local files and stdlib have one split)."""
    text_field: str = "text"
    """Field of each row that holds the text."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture: documents are drawn from these sources in proportion to their
    weights, in an order fixed by the run's seed; each source starts its next pass on its own
    when it runs out. Empty: the single source given by the keys above."""
    shuffle_buffer: int = 0
    """Documents held in seeded shuffle buffers (0: off, documents in stream order), over all
    logical shards: each shard holds shuffle_buffer / logical_shards of them (rounded up), so
    a host holds its shards' share."""
    logical_shards: int | None = None
    """Independent streams the training rows are read from, each its own part of every source
    (every logical_shards-th file, or every logical_shards-th document when a source has fewer
    files), with its own mixture order, shuffle buffer and packing. Row j of every step's global
    batch of G rows (trainer.global_batch_size, all micro-batches) comes from shard
    j // (G / logical_shards), so the rows are a function of the seed, this block and the row's
    place alone, never of the host count or the micro-batch split; each host reads only the
    shards of its own rows and a checkpoint holds every shard's position: a run resumes on any
    host count the rule allows. Rule, checked at start-up: G is a multiple of logical_shards,
    which is a multiple of hosts x trainer.grad_accum_steps (a host's rows of a micro-batch are
    whole shards). null: G (one row of each step per shard, the most hosts a batch allows). A
    resume needs the value the checkpoint was written with."""
    max_doc_chars: int = 0
    """Cut a document longer than this many characters into pieces of at most this many, after
    the last line end that fits (data/pieces.py); each piece is then a document of its own:
    shuffled, held out (eval.holdout), given its EOS and segment on its own. Long files are
    then spread through the shuffle buffer instead of filling hundreds of consecutive rows.
    0: off (documents whole)."""
    tokenizer: str = "byte"
    """byte: UTF-8 bytes as tokens, plus BOS, EOS and pad (vocabulary 259, no files); or the
    path of a local HF tokenizer folder (tokenizer.json, with its special tokens named in
    tokenizer_config.json or special_tokens_map.json; tools/train_tokenizer.py makes one)."""
    add_bos: bool = False
    """Start every document with the tokenizer's BOS token (Llama 3 does)."""
    block_size: int = 256
    """Tokens per training row (sequence length)."""
    packing: Packing = Packing.concat
    """concat: documents joined, each followed by EOS, and cut into rows of block_size;
    document: the same, plus segment and position ids so that attention and the loss stay
    within each document (a document cut by a row's end goes on as a new segment in the next
    row, positions from 0); pad: one document a row, truncated or padded with the pad id
    (no loss on padding)."""
    collator: str = "causal_lm"
    """How rows become model inputs (collators.COLLATORS)."""
    on_bad_row: BadRowPolicy = BadRowPolicy.error
    """error: a row without text (field missing, null, or not a string) stops the run naming
    its file and row; skip: such rows are left out, logged and counted. Problems of a whole
    file (columns that differ from the first file's, bytes that are not UTF-8, a line that is
    not JSON, a damaged Parquet file) always stop the run."""
    max_bad_rows: int = 100
    """With on_bad_row=skip: the run stops when one source has skipped more rows than this
    (over all passes, in one logical shard)."""

    def problems(self, key: str = "data") -> Problems:
        from collators import COLLATORS

        found = Problems()
        if self.sources:
            for i, source in enumerate(self.sources):
                found += source.problems(f"{key}.sources[{i}]")
        else:
            source_problems(found, key, self.source, self.path)
        found.check(
            self.shuffle_buffer >= 0,
            f"{key}.shuffle_buffer={self.shuffle_buffer}: must be 0 (off) or more.",
        )
        found.check(
            self.logical_shards is None or self.logical_shards >= 1,
            f"{key}.logical_shards={self.logical_shards}: must be 1 or more (null: "
            "trainer.global_batch_size).",
        )
        found.check(
            self.max_doc_chars >= 0,
            f"{key}.max_doc_chars={self.max_doc_chars}: must be 0 (off) or more.",
        )
        found.check(
            self.block_size >= 2, f"{key}.block_size={self.block_size}: must be at least 2."
        )
        found.check(
            self.max_bad_rows >= 0,
            f"{key}.max_bad_rows={self.max_bad_rows}: must be 0 or more.",
        )
        found.check(
            self.collator in COLLATORS,
            f"{key}.collator={self.collator!r}: known collators are {', '.join(COLLATORS)}.",
        )
        return found
