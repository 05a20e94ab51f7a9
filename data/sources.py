"""Streaming text sources (HF `datasets`), each host reading its own disjoint part."""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator

import datasets
from datasets.distributed import split_dataset_by_node

from data.config import DataConfig
from torchprime.errors import ConfigError

SOURCES = ("stdlib", "files", "hub")
FILE_FORMATS = {"text": "text", "json": "json", "parquet": "parquet"}
_EXTENSIONS = {"text": None, "json": (".json", ".jsonl"), "parquet": (".parquet",)}


def stdlib_files() -> list[str]:
    """The embedded default corpus: the .py files of the running Python's standard library
    (its test suite and site-packages left out), in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    skip = (os.sep + "site-packages" + os.sep, os.sep + "test" + os.sep)
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if not any(s in f for s in skip))


def local_files(path: str, fmt: str) -> list[str]:
    """Files named by `path` (a file, a folder searched recursively, or a glob), sorted."""
    if os.path.isdir(path):
        candidates = glob.glob(os.path.join(path, "**", "*"), recursive=True)
    else:
        candidates = glob.glob(path, recursive=True)
    files = sorted(f for f in candidates if os.path.isfile(f))
    if _EXTENSIONS[fmt]:
        files = [f for f in files if f.endswith(_EXTENSIONS[fmt])]
    if not files:
        raise ConfigError(f"data.path={path!r}: no {fmt} files there.")
    return files


def open_stream(cfg: DataConfig) -> datasets.IterableDataset:
    """The whole source as a streaming dataset (nothing is downloaded ahead)."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"data.source={cfg.source!r}: choose one of {', '.join(SOURCES)}.")
    if cfg.source == "hub":
        if not cfg.path:
            raise ConfigError("data.source=hub needs data.path, the dataset's name on the hub.")
        return datasets.load_dataset(cfg.path, cfg.hub_config, split=cfg.split, streaming=True)
    if cfg.source == "stdlib":
        files, fmt = stdlib_files(), "text"
    else:
        if cfg.format not in FILE_FORMATS:
            raise ConfigError(
                f"data.format={cfg.format!r}: choose one of {', '.join(FILE_FORMATS)}."
            )
        if not cfg.path:
            raise ConfigError("data.source=files needs data.path (a file, folder or glob).")
        files, fmt = local_files(cfg.path, cfg.format), cfg.format
    kwargs = {"sample_by": "document", "encoding_errors": "replace"} if fmt == "text" else {}
    return datasets.load_dataset(
        FILE_FORMATS[fmt], data_files=files, split="train", streaming=True, **kwargs
    )


def host_texts(cfg: DataConfig, process_index: int, process_count: int) -> Iterator[str]:
    """This host's documents, once through. `datasets` splits by files when their count divides
    evenly among hosts, by examples otherwise; the hosts' parts are disjoint."""
    stream = split_dataset_by_node(open_stream(cfg), rank=process_index, world_size=process_count)
    for i, row in enumerate(stream):
        if cfg.text_field not in row:
            raise ConfigError(
                f"data.text_field={cfg.text_field!r}: row {i} has no such field "
                f"(fields: {', '.join(row)})."
            )
        text = row[cfg.text_field]
        if not isinstance(text, str):
            raise ConfigError(
                f"data.text_field={cfg.text_field!r}: row {i} holds {type(text).__name__}, "
                "not text."
            )
        yield text
