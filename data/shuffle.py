"""A seeded shuffle buffer over documents (`data.shuffle_buffer`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class ShuffleBuffer:
    """Holds `size` documents; each call returns one of them at random and refills the slot
    from the stream, so a document leaves at most a few buffer-lengths from where it came.

    The state is the generator's state and the documents held (their text: a resume must
    give back exactly these documents, and re-reading them would mean rewinding every source).
    """

    def __init__(self, size: int, seed: int, shard: int):
        self.size = size
        self.items: list[str] = []
        # stream 1: the shuffle; each logical shard draws its own sequence
        self.rng = np.random.Generator(np.random.PCG64([seed % 2**63, 1, shard]))

    @property
    def full(self) -> bool:
        return len(self.items) >= self.size

    def next(self, pull: Callable[[], str]) -> str:
        while len(self.items) < self.size:  # the first call fills the buffer
            self.items.append(pull())
        j = int(self.rng.integers(self.size))
        item = self.items[j]
        self.items[j] = pull()
        return item

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "items": list(self.items)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.items = list(state["items"])
