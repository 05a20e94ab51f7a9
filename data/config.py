"""Schema of the `data` config group (configs/data/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    """Where text comes from and how it becomes fixed-size training rows."""

    source: str = "stdlib"
    """stdlib: the running Python's standard library sources, one document a file (no network,
    about 13 MB); files: local files at `path`; hub: the HF hub dataset named by `path`."""
    path: Optional[str] = None
    """files: a file, a folder or a glob; hub: the dataset name (e.g. allenai/c4)."""
    format: str = "text"
    """files: text (one document a file), json (JSON lines) or parquet."""
    hub_config: Optional[str] = None
    """hub: the dataset's configuration name (e.g. "en" for allenai/c4)."""
    split: str = "train"
    """Split to read."""
    text_field: str = "text"
    """Field of each row that holds the text."""
    tokenizer: str = "byte"
    """byte: UTF-8 bytes as tokens, plus BOS, EOS and pad (vocabulary 259, no files)."""
    block_size: int = 256
    """Tokens per training row (sequence length)."""
    packing: str = "concat"
    """concat: documents joined, each followed by EOS, and cut into rows of block_size."""
    collator: str = "causal_lm"
    """How rows become model inputs (collators.COLLATORS)."""
