"""Which source the next document comes from, for a weighted mixture, fixed by the seed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class Mixture:
    """An endless sequence of source indices whose shares follow the weights.

    The sequence is cut into blocks of about BLOCK draws. Block b holds source i
    floor(q_i (b+1)) - floor(q_i b) times, q_i = BLOCK x weight_i / sum(weights), in an order
    shuffled by a generator seeded with (seed, b). So after any number of blocks each source
    has had its share to within one document (a plain weighted draw would drift by about
    sqrt(n) documents), the order within a block is random, and any position is recomputed
    from (block, offset) alone: that pair is the whole state. Each logical shard draws its own
    sequence (seeded with the shard too; shard 0's is the one a single stream drew before
    logical shards existed: numpy pads a seed with zeros).
    """

    BLOCK = 1000

    def __init__(self, weights: list[float], seed: int, shard: int = 0):
        total = float(sum(weights))
        self.quotas = [self.BLOCK * w / total for w in weights]
        self.seed = seed % 2**63  # numpy seeds are non-negative
        self.shard = shard
        self.block = 0
        self.offset = 0
        self._order = self._make_block(0)

    def _make_block(self, b: int) -> list[int]:
        counts = [math.floor(q * (b + 1)) - math.floor(q * b) for q in self.quotas]
        order = np.repeat(np.arange(len(counts)), counts)
        np.random.default_rng([self.seed, 0, b, self.shard]).shuffle(order)  # stream 0: the mixture
        return order.tolist()

    def next(self) -> int:
        while self.offset >= len(self._order):
            self.block += 1
            self.offset = 0
            self._order = self._make_block(self.block)
        i = self._order[self.offset]
        self.offset += 1
        return i

    def state(self) -> dict[str, Any]:
        return {"block": self.block, "offset": self.offset}

    def load_state(self, state: dict[str, Any]) -> None:
        self.block, self.offset = state["block"], state["offset"]
        self._order = self._make_block(self.block)
