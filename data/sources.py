"""Streaming text sources (HF `datasets`), each host reading its own disjoint part, pass after
pass, from a position that can be saved and restored."""

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

from data.config import DataConfig, SourceConfig
from data.holdout import Holdout
from torchprime.errors import ConfigError

log = logging.getLogger(__name__)

#: The file endings each format is read from, when a folder or a glob is given.
_EXTENSIONS = {"text": None, "json": (".json", ".jsonl"), "parquet": (".parquet",)}

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


def open_stream(spec: SourceLike, key: str = "data") -> datasets.IterableDataset:
    """The whole source as a streaming dataset (nothing is downloaded ahead)."""
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
        files, fmt = local_files(spec.path, spec.format, key), spec.format
    kwargs = {"sample_by": "document", "encoding_errors": "replace"} if fmt == "text" else {}
    return datasets.load_dataset(
        str(fmt), data_files=files, split="train", streaming=True, **kwargs
    )


def row_text(row: dict[str, Any], index: int, spec: SourceLike, key: str) -> str:
    """The text of one row, or a ConfigError naming the field and the source."""
    if spec.text_field not in row:
        raise ConfigError(
            f"{key}.text_field={spec.text_field!r}: row {index} of {describe(spec)} has no such "
            f"field (fields: {', '.join(row)})."
        )
    text = row[spec.text_field]
    if not isinstance(text, str):
        raise ConfigError(
            f"{key}.text_field={spec.text_field!r}: row {index} of {describe(spec)} holds "
            f"{type(text).__name__}, not text."
        )
    return text


def host_texts(
    spec: SourceLike, process_index: int, process_count: int, key: str = "data"
) -> Iterator[str]:
    """This host's documents, once through (empty ones included). `datasets` splits by files
    when their count divides evenly among hosts, by examples otherwise; the parts are
    disjoint."""
    stream = split_dataset_by_node(
        open_stream(spec, key), rank=process_index, world_size=process_count
    )
    for i, row in enumerate(stream):
        yield row_text(row, i, spec, key)


class SourceReader:
    """One source's non-empty documents for this host, pass after pass without end.

    The position is the `datasets` stream's own state (which file or shard, which example in
    it) plus the pass number. Restoring it skips the files before the current one unread and
    re-reads only the current file up to the saved example (Arrow tables are skipped without
    being converted), so a resume costs at most one file or shard of reading per source.
    """

    def __init__(
        self,
        spec: SourceConfig,
        key: str,
        process_index: int,
        process_count: int,
        holdout: Holdout | None = None,
    ):
        self.spec = spec
        self.holdout = holdout
        """Which side of the held-out split this reader keeps (None: every document)."""
        self.key = key
        self.process_index = process_index
        self.process_count = process_count
        self.base = open_stream(spec, key)  # fails now, naming the path, if there is none
        self.epoch = 0
        """Passes completed over this host's part."""
        self.docs = 0
        """Non-empty documents read in the current pass (of the held-out side it keeps)."""
        self.rows = 0
        """Rows (empty documents included) read in the current pass."""
        self._stream: datasets.IterableDataset | None = None
        self._it: Iterator[dict[str, Any]] | None = None
        self._live = False  # the stream has yielded, so its state_dict() is the position
        self._start: dict | None = None  # the stream position to open at (a restored one)

    def _host_stream(self) -> datasets.IterableDataset:
        # A new view per pass: split_dataset_by_node makes a fresh IterableDataset, so a state
        # loaded into one pass's view never leaks into the next pass.
        return split_dataset_by_node(
            self.base, rank=self.process_index, world_size=self.process_count
        )

    def check(self) -> None:
        """Read this host's first rows up to the first document: a missing text field, a
        non-text field, an unreadable file or an empty part fails here, before training."""
        with self._reading():
            for i, row in enumerate(self._host_stream()):
                if self._keeps(row_text(row, i, self.spec, self.key)):
                    return
        raise self._empty()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        # Malformed content (a JSON line that does not parse, a broken Parquet file) is the
        # user's to fix; `datasets` logs which file, the message says which source.
        try:
            yield
        except pa.ArrowInvalid as e:
            raise ConfigError(f"{self.key}: cannot read {describe(self.spec)}: {e}") from None

    def _keeps(self, text: str) -> bool:
        # An empty document would only add an EOS (or a row of padding).
        return bool(text) and (self.holdout is None or self.holdout.keeps(text))

    def _empty(self) -> ConfigError:
        if self.holdout is not None:
            return ConfigError(
                f"{self.key}: {describe(self.spec)} gives host {self.process_index} of "
                f"{self.process_count} no documents on {self.holdout.describe()} (too few "
                "documents for that fraction: raise it, or give eval.data)."
            )
        return ConfigError(
            f"{self.key}: {describe(self.spec)} gives host {self.process_index} of "
            f"{self.process_count} no documents (no rows, or only empty text in "
            f"{self.spec.text_field!r})."
        )

    def next_text(self) -> str:
        while True:
            if self._it is None:
                self._stream = self._host_stream()
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
                    "data: %s pass %d done (%d documents on host %d); starting again",
                    describe(self.spec),
                    self.epoch,
                    self.docs,
                    self.process_index,
                )
                self.docs = self.rows = 0
                self._it = self._stream = self._start = None
                self._live = False
                continue
            self._live = True
            index = self.rows
            self.rows += 1
            text = row_text(row, index, self.spec, self.key)
            if self._keeps(text):
                self.docs += 1
                return text

    def state(self) -> dict[str, Any]:
        """The position: JSON data, a copy (the caller may keep it while reading goes on)."""
        stream = self._stream.state_dict() if self._live else copy.deepcopy(self._start)
        return {"epoch": self.epoch, "docs": self.docs, "rows": self.rows, "stream": stream}

    def load_state(self, state: dict[str, Any]) -> None:
        self.close()
        self.epoch, self.docs, self.rows = state["epoch"], state["docs"], state["rows"]
        self._start = copy.deepcopy(state["stream"])

    def close(self) -> None:
        """Close the open files now rather than at interpreter exit; reading can go on later,
        from the same position."""
        if self._live:
            self._start = self._stream.state_dict()
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = self._stream = None
        self._live = False
