"""Packing: documents of any length → rows of exactly `block_size` tokens."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torchprime.errors import ConfigError

PACKINGS = ("concat",)


def pack_concat(docs: Iterable[list[int]], block_size: int, eos_id: int) -> Iterator[list[int]]:
    """Join documents, each followed by EOS, and cut the stream into rows of block_size.

    A row may span documents; the tail shorter than a row waits for the next document.
    """
    buffer: list[int] = []
    start = 0
    for doc in docs:
        buffer.extend(doc)
        buffer.append(eos_id)
        while len(buffer) - start >= block_size:
            yield buffer[start : start + block_size]
            start += block_size
        if start:  # drop what has been emitted, keeping the tail
            del buffer[:start]
            start = 0


def check_packing(name: str) -> None:
    if name not in PACKINGS:
        raise ConfigError(f"data.packing={name!r}: choose one of {', '.join(PACKINGS)}.")
