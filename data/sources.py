"""Streaming text sources (HF `datasets`), each logical shard (data/pipeline.py) reading its own
disjoint part, pass after pass, from a position that can be saved and restored."""

from __future__ import annotations

import contextlib
import copy
import glob
import logging
import os
import sysconfig
from collections.abc import Iterator
from typing import Any

import datasets
import pyarrow as pa
from datasets.distributed import split_dataset_by_node
from datasets.exceptions import DatasetNotFoundError
from datasets.table import CastError

from data.config import DataConfig, SourceConfig
from data.holdout import Holdout
from data.pieces import split_document
from data.row_checks import SCAN_ROWS, BadRow, find_bad_rows, row_problem, scan_first_rows
from torchprime.errors import ConfigError

log = logging.getLogger(__name__)

#: The file endings each format is read from, when a folder or a glob is given.
_EXTENSIONS = {"text": None, "json": (".json", ".jsonl"), "parquet": (".parquet",)}

#: What `datasets` raises for a block it cannot read: columns that differ from the first
#: file's, bytes that are not UTF-8, a line that is not JSON, a damaged Parquet file.
READ_ERRORS = (pa.ArrowInvalid, CastError, UnicodeDecodeError, OSError)

#: A source's keys: a SourceConfig, or the top-level keys of a DataConfig.
SourceLike = SourceConfig | DataConfig


def stdlib_files() -> list[str]:
    """The embedded default corpus: the .py files of the running Python's standard library
    (its test suite and site-packages left out), in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    skip = (os.sep + "site-packages" + os.sep, os.sep + "test" + os.sep)
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if not any(s in f for s in skip))


def local_files(path: str, fmt: str, key: str = "data") -> list[str]:
    """Files named by `path` (a file, a folder searched recursively, or a glob), sorted."""
    if os.path.isdir(path):
        candidates = glob.glob(os.path.join(path, "**", "*"), recursive=True)
    else:
        candidates = glob.glob(path, recursive=True)
    files = sorted(f for f in candidates if os.path.isfile(f))
    if _EXTENSIONS[fmt]:
        files = [f for f in files if f.endswith(_EXTENSIONS[fmt])]
    if not files:
        raise ConfigError(f"{key}.path={path!r}: no {fmt} files there.")
    return files


def source_specs(cfg: DataConfig, key: str = "data") -> list[tuple[str, SourceConfig]]:
    """(config key, source) of every source: `data.sources`, or the top-level keys as one
    source of weight 1. The key (`key`, or `key.sources[i]`) names the source in messages."""
    if not cfg.sources:
        single = SourceConfig(
            source=cfg.source,
            path=cfg.path,
            format=cfg.format,
            hub_config=cfg.hub_config,
            split=cfg.split,
            text_field=cfg.text_field,
            weight=1.0,
        )
        return [(key, single)]
    return [(f"{key}.sources[{i}]", s) for i, s in enumerate(cfg.sources)]


def describe(spec: SourceLike) -> str:
    """How a source is named in logs and messages: `stdlib`, `files /data/*.jsonl`."""
    return spec.source if spec.source == "stdlib" else f"{spec.source} {spec.path}"


def open_stream(
    spec: SourceLike, key: str = "data", files: list[str] | None = None
) -> datasets.IterableDataset:
    """The whole source as a streaming dataset (nothing is downloaded ahead); `files`: the
    local files when the caller has listed them already."""
    if spec.source == "hub":
        try:
            return datasets.load_dataset(
                spec.path, spec.hub_config, split=spec.split, streaming=True
            )
        except DatasetNotFoundError as e:
            raise ConfigError(
                f"{key}.path={spec.path!r}: no such dataset on the hub ({e})."
            ) from None
    if spec.source == "stdlib":
        files, fmt = stdlib_files(), "text"
    else:
        files, fmt = files or local_files(spec.path, spec.format, key), spec.format
    kwargs = {"sample_by": "document", "encoding_errors": "replace"} if fmt == "text" else {}
    return datasets.load_dataset(
        str(fmt), data_files=files, split="train", streaming=True, **kwargs
    )


def source_files(spec: SourceLike, key: str = "data") -> list[str]:
    """The local files of a `files` source (none for stdlib and hub)."""
    return local_files(spec.path, spec.format, key) if spec.source == "files" else []


def open_source(spec: SourceLike, key: str = "data") -> tuple[list[str], datasets.IterableDataset]:
    """(local files, whole stream) of a source; a ConfigError naming the path if it has none."""
    files = source_files(spec, key)
    return files, open_stream(spec, key, files)


def bad_row_error(key: str, spec: SourceLike, bad: BadRow, offer_skip: bool = True) -> ConfigError:
    """The error for a bad row or file, with how to go on."""
    if bad.row_level:
        head = f"{key}.text_field={spec.text_field!r}: "
        advice = "fix or remove that row, or set text_field to the field that holds the text"
        if offer_skip:
            advice += (
                ", or set data.on_bad_row=skip to train past such rows (they are counted in "
                "metrics.jsonl and logged with file and row)"
            )
    else:
        head = f"{key}: "
        advice = "fix or re-save that file, or leave it out of the source"
    return ConfigError(f"{head}{bad}. To go on: {advice}.")


def _reading_failed(key: str, spec: SourceLike, files: list[str], e: Exception) -> ConfigError:
    """A ConfigError naming the file and row behind a read error of `datasets` (CastError,
    UnicodeDecodeError, ArrowInvalid), found by reading the files in order."""
    try:
        bad = next(find_bad_rows(files, spec.format, spec.text_field), None) if files else None
    except OSError as gone:
        e = gone
        bad = None
    if isinstance(e, OSError) and e.filename:
        return ConfigError(
            f"{key}: cannot read {e.filename}: {e.strerror} (was it moved or deleted while the "
            f"run read {describe(spec)}?). Put it back, or leave it out and start again."
        )
    if bad is not None:
        return bad_row_error(key, spec, bad)
    first = (str(e).strip().splitlines() or [""])[0]
    return ConfigError(f"{key}: cannot read {describe(spec)}: {type(e).__name__}: {first}")


def row_text(row: dict[str, Any], index: int, spec: SourceLike, key: str) -> str:
    """The text of one row, or a ConfigError naming the field and the row of the source (see
    SourceReader for the file and the row within it)."""
    problem = row_problem(row, spec.text_field)
    if problem is not None:
        raise ConfigError(
            f"{key}.text_field={spec.text_field!r}: row {index + 1} of {describe(spec)} {problem}."
        )
    return row[spec.text_field]


def host_texts(
    spec: SourceLike, process_index: int, process_count: int, key: str = "data"
) -> Iterator[str]:
    """This host's documents, once through (empty ones included). `datasets` splits by files
    when their count divides evenly among hosts, by examples otherwise; the parts are
    disjoint."""
    files = source_files(spec, key)
    if (bad := scan_first_rows(files, spec.format, spec.text_field)) is not None:
        raise bad_row_error(key, spec, bad, offer_skip=False)
    stream = split_dataset_by_node(
        open_stream(spec, key, files), rank=process_index, world_size=process_count
    )
    try:
        for i, row in enumerate(stream):
            if row_problem(row, spec.text_field) is None:
                yield row[spec.text_field]
                continue
            bad = next((b for b in find_bad_rows(files, spec.format, spec.text_field)), None)
            if bad is None:
                row_text(row, i, spec, key)  # raises, naming the row of the source
            raise bad_row_error(key, spec, bad, offer_skip=False)
    except READ_ERRORS as e:
        raise _reading_failed(key, spec, files, e) from None


def shard_stream(
    stream: datasets.IterableDataset, shard: int, shards: int
) -> datasets.IterableDataset:
    """Logical shard `shard` of `shards` of a source, a new view each call (a state loaded into
    one pass's view never leaks into the next pass). With at least `shards` files (the
    `datasets` stream's data sources) a shard is every `shards`-th file, and reads only those;
    with fewer, it is every `shards`-th document, and reads the whole source to keep them
    (`datasets` cannot cut a file into parts): give a source at least as many files as
    data.logical_shards. The parts are disjoint and fixed by (shard, shards) alone."""
    if shards > 1 and stream.num_shards >= shards:
        return stream.shard(num_shards=shards, index=shard, contiguous=False)
    return split_dataset_by_node(stream, rank=shard, world_size=shards)


class SourceReader:
    """One source's non-empty documents for one logical shard, pass after pass without end.

    The position is the `datasets` stream's own state (which file or shard, which example in
    it) plus the pass number. Restoring it skips the files before the current one unread and
    re-reads only the current file up to the saved example (Arrow tables are skipped without
    being converted), so a resume costs at most one file or shard of reading per source.
    """

    def __init__(
        self,
        spec: SourceConfig,
        key: str,
        shard: int,
        shards: int,
        holdout: Holdout | None = None,
        on_bad_row: str = "error",
        max_bad_rows: int = 0,
        max_doc_chars: int = 0,
        opened: tuple[list[str], datasets.IterableDataset] | None = None,
    ):
        """`opened`: (files, stream) of the source as `open_source` gave them, shared by the
        shards of a host (opening a source lists and indexes its files: seconds each)."""
        self.spec = spec
        self.max_doc_chars = max_doc_chars
        """Rows longer than this are read as several documents (data.max_doc_chars; 0: off)."""
        self._pieces: list[str] = []  # the current row's pieces not yet read, in order
        self.holdout = holdout
        """Which side of the held-out split this reader keeps (None: every document)."""
        self.key = key
        self.shard = shard
        """This reader's logical shard (data.logical_shards), of `shards`."""
        self.shards = shards
        self.on_bad_row = on_bad_row
        self.max_bad_rows = max_bad_rows
        # fails now, naming the path, if there is none
        self.files, self.base = opened or open_source(spec, key)
        self.skipped = 0
        """Bad rows skipped (data.on_bad_row=skip), over every pass."""
        self._bad_in_pass = 0  # bad rows met in the current pass
        self._bad_rows: Iterator[BadRow] | None = None  # the files' bad rows, in order
        self.epoch = 0
        """Passes completed over this shard's part."""
        self.docs = 0
        """Non-empty documents (pieces, with max_doc_chars) read in the current pass, of the
        held-out side it keeps."""
        self.rows = 0
        """Rows (empty documents included) read in the current pass."""
        self._stream: datasets.IterableDataset | None = None
        self._it: Iterator[dict[str, Any]] | None = None
        self._live = False  # the stream has yielded, so its state_dict() is the position
        self._start: dict | None = None  # the stream position to open at (a restored one)

    def _shard_stream(self) -> datasets.IterableDataset:
        return shard_stream(self.base, self.shard, self.shards)

    def part(self) -> str:
        """What this reader reads, for messages: "stdlib, logical shard 3 of 8
        (data.logical_shards)", or the source alone when one shard reads it whole."""
        where = f", logical shard {self.shard} of {self.shards} (data.logical_shards)"
        return describe(self.spec) + (where if self.shards > 1 else "")

    def check(self, scan_files: bool = True) -> None:
        """Read the first rows of every file of the source (not only this shard's: a folder
        whose files disagree on their columns fails on every host alike; `scan_files` False:
        another shard of this host did), then this shard's stream up to its first document: a
        missing or non-text field, bytes that are not UTF-8, a file that does not parse or an
        empty part fails here, before training."""
        skipping = self.on_bad_row == "skip"
        if scan_files:
            found = find_bad_rows(self.files, self.spec.format, self.spec.text_field, SCAN_ROWS)
            bad = next((b for b in found if not (skipping and b.row_level)), None)
            if bad is not None:
                raise bad_row_error(self.key, self.spec, bad)
        with self._reading():
            for row in self._shard_stream():
                text = row.get(self.spec.text_field) if isinstance(row, dict) else None
                if isinstance(text, str) and any(
                    self._keeps(p) for p in split_document(text, self.max_doc_chars)
                ):
                    return
                if not isinstance(text, str) and self.on_bad_row != "skip":
                    self._bad_row()  # raises
        raise self._empty()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        # Malformed content (columns that differ between files, bytes that are not UTF-8, a
        # JSON line that does not parse, a broken Parquet file) is the user's to fix; these
        # stop the run even with on_bad_row=skip: `datasets` reads the file in blocks and
        # cannot go on past a bad one within it.
        try:
            yield
        except READ_ERRORS as e:
            raise _reading_failed(self.key, self.spec, self.files, e) from None

    def _bad_row(self) -> None:
        """A row without text in this pass: the error (on_bad_row=error), or one more skipped
        row logged with its file and row, up to data.max_bad_rows."""
        if self._bad_rows is None:
            found = find_bad_rows(self.files, self.spec.format, self.spec.text_field)
            self._bad_rows = (b for b in found if b.row_level)
            for _ in range(self._bad_in_pass):  # a restored position: skip those met before
                next(self._bad_rows, None)
        self._bad_in_pass += 1
        bad = next(self._bad_rows, None)
        where = str(bad) if bad is not None else f"a row of {describe(self.spec)} without text"
        if self.on_bad_row != "skip":
            if bad is None:
                raise ConfigError(f"{self.key}: {where}.")
            raise bad_row_error(self.key, self.spec, bad)
        self.skipped += 1
        if self.skipped > self.max_bad_rows:
            raise ConfigError(
                f"{self.key}: {self.skipped} bad rows skipped, more than "
                f"data.max_bad_rows={self.max_bad_rows}; the last: {where}. Fix the data, or "
                "raise data.max_bad_rows."
            )
        log.warning(
            "data: skipped %s (%d skipped, data.max_bad_rows=%d)",
            where,
            self.skipped,
            self.max_bad_rows,
        )

    def _keeps(self, text: str) -> bool:
        # An empty document would only add an EOS (or a row of padding).
        return bool(text) and (self.holdout is None or self.holdout.keeps(text))

    def _empty(self) -> ConfigError:
        if self.holdout is not None:
            return ConfigError(
                f"{self.key}: {self.part()} gives no documents on {self.holdout.describe()} "
                "(too few documents for that fraction: raise it, "
                + ("lower data.logical_shards, " if self.shards > 1 else "")
                + "or give eval.data)."
            )
        return ConfigError(
            f"{self.key}: {self.part()} gives no documents (no rows, "
            f"or only empty text in {self.spec.text_field!r}"
            + (
                "; with fewer documents than shards some get none: lower data.logical_shards"
                if self.shards > 1
                else ""
            )
            + ")."
        )

    def next_text(self) -> str:
        while True:
            while self._pieces:
                piece = self._pieces.pop(0)
                if self._keeps(piece):
                    self.docs += 1
                    return piece
            if self._it is None:
                self._stream = self._shard_stream()
                if self._start is not None:
                    self._stream.load_state_dict(self._start)
                self._it = iter(self._stream)
                self._live = False
            try:
                with self._reading():
                    row = next(self._it)
            except StopIteration:
                if self.docs == 0:
                    raise self._empty() from None
                self.epoch += 1
                log.info(
                    "data: %s: pass %d done (%d documents); starting again",
                    self.part(),
                    self.epoch,
                    self.docs,
                )
                self.docs = self.rows = self._bad_in_pass = 0
                self._bad_rows = None
                self._it = self._stream = self._start = None
                self._live = False
                continue
            self._live = True
            self.rows += 1
            text = row.get(self.spec.text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                self._bad_row()  # raises unless skipping
                continue
            self._pieces = split_document(text, self.max_doc_chars)

    def state(self) -> dict[str, Any]:
        """The position: JSON data, a copy (the caller may keep it while reading goes on)."""
        stream = self._stream.state_dict() if self._live else copy.deepcopy(self._start)
        return {
            "epoch": self.epoch,
            "docs": self.docs,
            "rows": self.rows,
            "skipped": self.skipped,
            "bad_in_pass": self._bad_in_pass,
            "stream": stream,
            "pieces": list(self._pieces),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.close()
        self.epoch, self.docs, self.rows = state["epoch"], state["docs"], state["rows"]
        self.skipped, self._bad_in_pass = state.get("skipped", 0), state.get("bad_in_pass", 0)
        self._bad_rows = None
        self._start = copy.deepcopy(state["stream"])
        self._pieces = list(state.get("pieces", []))

    def close(self) -> None:
        """Close the open files now rather than at interpreter exit; reading can go on later,
        from the same position."""
        if self._live:
            self._start = self._stream.state_dict()
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = self._stream = None
        self._live = False
