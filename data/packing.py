"""Packing (`data.packing`): documents of any length → rows of exactly `block_size` tokens.

A packer pulls documents (token ids, already wrapped in BOS / EOS) one at a time from a
callable and returns rows: a dict of equal-length int lists, with the same keys every time.
  concat    input_ids
  document  input_ids, segment_ids (1, 2, ... along the row), position_ids (0 at each segment)
  pad       input_ids, attention_mask (1: a token of the document, 0: padding)
The collator turns rows into the model's tensors (labels included).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import StrEnum
from itertools import chain
from typing import Any

Row = dict[str, list[int]]
NextDoc = Callable[[], list[int]]


class Packer:
    keys: tuple[str, ...] = ()

    def __init__(self, block_size: int, pad_id: int):
        self.block_size = block_size
        self.pad_id = pad_id

    def next_row(self, next_doc: NextDoc) -> Row:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Tokens pulled but not yet in a returned row (empty for a packer that holds none).
        Cheap: it shares the packer's immutable pieces instead of copying them."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


class ConcatPacker(Packer):
    """Documents joined into one stream and cut into rows; a row may span documents and a
    document may span rows. What is left after a row waits for the next one."""

    keys = ("input_ids",)

    def __init__(self, block_size: int, pad_id: int):
        super().__init__(block_size, pad_id)
        # Pending documents (tuples: a state can share them) and how much of the first one was
        # already used: cutting a long document does not copy its tail at each row.
        self.pieces: deque[tuple[int, ...]] = deque()
        self.head = 0
        self.pending = 0

    def _take(self, next_doc: NextDoc) -> list[tuple[int, ...]]:
        """The next block_size tokens, as the parts of the documents they come from."""
        while self.pending < self.block_size:
            doc = tuple(next_doc())
            self.pieces.append(doc)
            self.pending += len(doc)
        parts, need = [], self.block_size
        while need:
            piece = self.pieces[0]
            n = min(len(piece) - self.head, need)
            parts.append(piece[self.head : self.head + n])
            need -= n
            if self.head + n == len(piece):
                self.pieces.popleft()
                self.head = 0
            else:
                self.head += n
        self.pending -= self.block_size
        return parts

    def next_row(self, next_doc: NextDoc) -> Row:
        return {"input_ids": list(chain.from_iterable(self._take(next_doc)))}

    def state(self) -> dict[str, Any]:
        # The first piece's first `head` tokens are already in rows.
        return {"pieces": list(self.pieces), "head": self.head}

    def load_state(self, state: dict[str, Any]) -> None:
        self.pieces = deque(tuple(p) for p in state["pieces"])
        self.head = state["head"]
        self.pending = sum(len(p) for p in self.pieces) - self.head


class DocumentPacker(ConcatPacker):
    """concat, plus which document each token belongs to and its position in it. The part of
    a document that continues in the next row is a new segment there, from position 0."""

    keys = ("input_ids", "segment_ids", "position_ids")

    def next_row(self, next_doc: NextDoc) -> Row:
        parts = self._take(next_doc)
        return {
            "input_ids": list(chain.from_iterable(parts)),
            "segment_ids": list(chain.from_iterable([s] * len(p) for s, p in enumerate(parts, 1))),
            "position_ids": list(chain.from_iterable(range(len(p)) for p in parts)),
        }


class PadPacker(Packer):
    """One document a row: cut to block_size (the rest of a longer document is dropped), or
    filled up with the pad id. Holds nothing between rows."""

    keys = ("input_ids", "attention_mask")

    def next_row(self, next_doc: NextDoc) -> Row:
        doc = next_doc()[: self.block_size]
        fill = self.block_size - len(doc)
        return {
            "input_ids": doc + [self.pad_id] * fill,
            "attention_mask": [1] * len(doc) + [0] * fill,
        }


class Packing(StrEnum):
    """`data.packing`: how documents become rows (the classes above)."""

    concat = "concat"
    document = "document"
    pad = "pad"


PACKERS: dict[Packing, type[Packer]] = {
    Packing.concat: ConcatPacker,
    Packing.document: DocumentPacker,
    Packing.pad: PadPacker,
}


def build_packer(name: str, block_size: int, pad_id: int) -> Packer:
    return PACKERS[Packing(name)](block_size, pad_id)
