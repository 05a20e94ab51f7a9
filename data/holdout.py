"""The held-out share of a corpus (`eval.holdout`): which documents evaluation reads and
training never sees.

A document is held out when a hash of its text falls below the fraction. The choice is a
function of the document alone: the same documents are held out whatever the seed, the host
count, the mesh, the shuffle or the mixture, so every run of a corpus is evaluated on the same
text, and training (which keeps the other documents) skips exactly those. Identical documents
share one fate, so a duplicate of a held-out document cannot leak into training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

_SALT = b"torchprime-holdout-v1\0"  # a new salt would choose another held-out set


def holdout_score(text: str) -> float:
    """A number in [0, 1) fixed by the text, uniformly spread over documents."""
    digest = hashlib.blake2b(_SALT + text.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2**64


@dataclass(frozen=True)
class Holdout:
    """Which side of the split a stream reads: the held-out documents (evaluation) or the rest
    (training)."""

    fraction: float
    """Share of the documents held out, in (0, 0.5]."""
    held_out: bool
    """True: read only the held-out documents; False: only the others."""

    def keeps(self, text: str) -> bool:
        return (holdout_score(text) < self.fraction) == self.held_out

    def describe(self) -> str:
        side = "held-out" if self.held_out else "training"
        return f"the {side} side of eval.holdout={self.fraction:g}"
