"""Weighted mixtures: realized shares, independent restarts, order fixed by the seed; the
optional shuffle buffer."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data.config import DataConfig, SourceConfig
from data.mixture import Mixture
from data.pipeline import TextBatches
from data.tokenizers import ByteTokenizer

SIZES = {"a": 50, "b": 7, "c": 13}  # documents in each source: they run out at different times


@pytest.fixture
def sources(tmp_path):
    """Source x holds JSON lines "x0", "x1", ...: a row's first byte says which source."""
    specs = {}
    for name, n in SIZES.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(n)))
        specs[name] = SourceConfig(source="files", path=str(path), format="json")
    return specs


def documents(sources, weights, n, seed=0, shuffle_buffer=0):
    """The first n documents of the mixture (pad packing: one document a row), and the
    pipeline."""
    cfg = DataConfig(
        logical_shards=1,
        sources=[SourceConfig(**{**vars(sources[k]), "weight": w}) for k, w in weights.items()],
        packing="pad",
        block_size=4,
        shuffle_buffer=shuffle_buffer,
    )
    p = TextBatches(cfg, ByteTokenizer(), batch_size=1000, seed=seed)
    tok = ByteTokenizer()
    docs = [tok.decode(row) for _ in range(n // 1000) for row in next(p)["input_ids"].tolist()]
    return docs, p


def test_shares_over_10000_documents_are_within_1_percent_of_the_weights(sources):
    weights = {"a": 6, "b": 3, "c": 1}  # need not sum to 1
    docs, p = documents(sources, weights, 10_000, seed=42)
    counts = Counter(d[0] for d in docs)
    shares = {k: counts[k] / len(docs) for k in weights}
    for k, w in weights.items():
        assert abs(shares[k] - w / 10) < 0.01, shares
    # each source started its passes on its own: a pass of b is 7 documents, of a 50 (a pass
    # is over when a read finds nothing more, so a's 6000 documents make 119 passes, not 120)
    passes = {k: r.epoch for k, r in zip(weights, p.readers)}
    assert passes == {k: (counts[k] - 1) // SIZES[k] for k in weights}
    assert passes == {"a": 119, "b": 428, "c": 76}
    # within a pass, a source's documents come in their stream order
    from_b = [d for d in docs if d[0] == "b"]
    assert from_b[:9] == ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b0", "b1"]


def test_every_stretch_of_a_mixture_keeps_close_to_the_weights(sources):
    docs, _ = documents(sources, {"a": 0.5, "b": 0.3, "c": 0.2}, 2000, seed=1)
    # 1000 draws are one block of the mixture: its counts are exact
    assert Counter(d[0] for d in docs[:1000]) == {"a": 500, "b": 300, "c": 200}
    # the order within a block is random, not a fixed pattern
    assert docs[:1000] != docs[1000:]


def test_the_order_is_fixed_by_the_seed(sources):
    weights = {"a": 0.5, "b": 0.5}
    first, _ = documents(sources, weights, 1000, seed=3)
    again, _ = documents(sources, weights, 1000, seed=3)
    other, _ = documents(sources, weights, 1000, seed=4)
    assert first == again
    assert first != other and Counter(d[0] for d in first) == Counter(d[0] for d in other)


def test_odd_weights_keep_their_shares_block_after_block():
    weights = [0.7, 0.2, 0.07, 0.03 / 7, 0.03 * 6 / 7]  # per block of 1000: 4.29 and 25.71 draws
    m = Mixture(weights, seed=0)
    draws = Counter()
    while (i := m.next()) is not None and m.block < 100:
        draws[i] += 1
    # after 100 blocks each source had floor(100 x its quota) draws, its share to one document
    assert [draws[i] for i in range(5)] == [70_000, 20_000, 7_000, 428, 2_571]


def test_the_shuffle_buffer_mixes_documents_seeded_by_the_run_seed(sources):
    weights = {"a": 1}
    plain, _ = documents(sources, weights, 2000)
    shuffled, p = documents(sources, weights, 1000, shuffle_buffer=20)
    again, _ = documents(sources, weights, 1000, shuffle_buffer=20)
    assert plain[:50] == [f"a{i}" for i in range(50)]
    assert shuffled == again and shuffled[:50] != plain[:50]
    # nothing lost or doubled: what came out plus what the buffer holds is what was read
    assert Counter(shuffled) + Counter(p.streams[0].shuffle.items) == Counter(plain[:1020])
    # the i-th document out was among the first i + 20 read (positions 0-29: all in pass 1)
    assert all(int(d[1:]) <= i + 20 for i, d in enumerate(shuffled[:30]))
