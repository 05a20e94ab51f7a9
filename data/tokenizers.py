"""Tokenizers by name (`data.tokenizer`). Each turns text into token ids with explicit
BOS / EOS / pad ids and knows its vocabulary size."""

from __future__ import annotations

from typing import Protocol

from torchprime.errors import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; BOS, EOS and pad follow. Needs no files, works on any text."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOKENIZERS = {"byte": ByteTokenizer}


def build_tokenizer(name: str) -> Tokenizer:
    if name not in TOKENIZERS:
        raise ConfigError(f"data.tokenizer={name!r}: known tokenizers are {', '.join(TOKENIZERS)}.")
    return TOKENIZERS[name]()
