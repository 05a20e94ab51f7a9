"""Tokenizers (`data.tokenizer`): `byte`, or the path of a local HF tokenizer folder. Each
turns text into token ids with explicit BOS / EOS / pad ids and knows its vocabulary size."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Protocol

from torchprime.errors import ConfigError

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """The text's token ids; with max_tokens, only the first max_tokens of them (a long
        document cut to one row need not be tokenized whole)."""
        ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; BOS, EOS and pad follow. Needs no files, works on any text."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        if max_tokens is None:
            return list(text.encode("utf-8"))
        # every character is at least one byte: the first max_tokens characters hold the
        # first max_tokens bytes
        return list(text[:max_tokens].encode("utf-8")[:max_tokens])

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


#: Files of an HF tokenizer folder that may name its special tokens, in the order read.
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _token_content(value: Any) -> str | None:
    """A special token as HF folders write it: a string, or {"content": ...} (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def special_tokens(folder: str) -> dict[str, str]:
    """bos_token, eos_token and pad_token as the folder names them (the first file that names
    one wins)."""
    found: dict[str, str] = {}
    for name in SPECIAL_TOKEN_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            try:
                entries = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.tokenizer: {path} is not valid JSON ({e}).") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            token = _token_content(entries.get(key))
            if token and key not in found:
                found[key] = token
    return found


class HFTokenizer:
    """A local HF tokenizer folder (tokenizer.json, read with the `tokenizers` library).

    The special ids come from the tokens the folder names (tokenizer_config.json, then
    special_tokens_map.json): EOS is required, BOS and pad fall back to EOS (packing never
    needs a distinct pad id: padding is marked by position). The pipeline adds BOS / EOS
    itself, so the tokenizer's own template (post-processor) is not applied, and special-token
    strings found in the text are encoded as plain text: data cannot inject an EOS.
    """

    def __init__(self, folder: str):
        from tokenizers import Tokenizer as RustTokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(f"data.tokenizer={folder!r}: no tokenizer.json in that folder.")
        try:
            self._tok = RustTokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ConfigError(f"data.tokenizer={folder!r}: cannot read {path} ({e}).") from None
        self._tok.encode_special_tokens = True
        self.folder = folder
        names = special_tokens(folder)
        if "eos_token" not in names:
            raise ConfigError(
                f"data.tokenizer={folder!r}: the folder names no eos_token (looked in "
                f"{' and '.join(SPECIAL_TOKEN_FILES)}); packing needs one to end documents."
            )
        ids = {key: self._id(token, key) for key, token in names.items()}
        self.eos_id = ids["eos_token"]
        self.bos_id = ids.get("bos_token", self.eos_id)
        self.pad_id = ids.get("pad_token", self.eos_id)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1  # ids may leave gaps: the largest one counts
        log.info(
            "tokenizer: %s, vocabulary %d, bos %d, eos %d, pad %d",
            folder,
            self.vocab_size,
            self.bos_id,
            self.eos_id,
            self.pad_id,
        )

    def _id(self, token: str, key: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ConfigError(
                f"data.tokenizer={self.folder!r}: {key} {token!r} is not in tokenizer.json's "
                "vocabulary."
            )
        return i

    #: with max_tokens, tokenize a prefix of the text that gives this many tokens more
    PREFIX_MARGIN = 32

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        if max_tokens is None:
            return self._tok.encode(text, add_special_tokens=False).ids
        # A prefix of the text tokenizes like the whole text except for its last words (BPE
        # never merges across the pre-tokenizer's word boundaries), so the first max_tokens
        # ids are the whole text's unless one word straddles the margin. Start at 8 characters
        # a token (typical text has 3 to 5) and double until the prefix gives enough.
        chars = 8 * (max_tokens + self.PREFIX_MARGIN)
        while True:
            ids = self._tok.encode(text[:chars], add_special_tokens=False).ids
            if chars >= len(text) or len(ids) >= max_tokens + self.PREFIX_MARGIN:
                return ids[:max_tokens]
            chars *= 2

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


TOKENIZERS = {"byte": ByteTokenizer}


def build_tokenizer(name: str) -> Tokenizer:
    """A tokenizer by name, or from the HF tokenizer folder at that path."""
    if name in TOKENIZERS:
        return TOKENIZERS[name]()
    if os.path.isdir(name):
        return HFTokenizer(name)
    raise ConfigError(
        f"data.tokenizer={name!r}: neither a known tokenizer ({', '.join(TOKENIZERS)}) nor a "
        "folder with a tokenizer.json."
    )
