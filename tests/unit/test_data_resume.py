"""Exact resume: a pipeline restored from the state taken after batch k-1 yields batches
k, k+1, ... equal element for element to those of an uninterrupted pipeline."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.config import DataConfig, SourceConfig
from data.pipeline import TextBatches
from data.tokenizers import ByteTokenizer
from torchprime.errors import ConfigError

N = 10  # batches compared


def doc(tag: str, i: int) -> str:
    return f"{tag}{i} " * (i % 7 + 1)  # 3 to 40 bytes: rows span documents and vice versa


@pytest.fixture
def corpus(tmp_path):
    """Three sources: 5 text files, 11 JSON lines in 2 files, 9 Parquet rows in 2 files."""
    (tmp_path / "txt").mkdir()
    for i in range(5):
        (tmp_path / "txt" / f"{i}.txt").write_text(doc("t", i))
    (tmp_path / "json").mkdir()
    for f, lines in enumerate([range(0, 7), range(7, 11)]):
        rows = "".join(json.dumps({"text": doc("j", i)}) + "\n" for i in lines)
        (tmp_path / "json" / f"{f}.jsonl").write_text(rows)
    (tmp_path / "pq").mkdir()
    for f, lines in enumerate([range(0, 5), range(5, 9)]):
        table = pa.table({"text": [doc("p", i) for i in lines]})
        pq.write_table(table, tmp_path / "pq" / f"{f}.parquet", row_group_size=2)
    return {
        "txt": SourceConfig(source="files", path=str(tmp_path / "txt"), format="text", weight=0.5),
        "json": SourceConfig(
            source="files", path=str(tmp_path / "json"), format="json", weight=0.3
        ),
        "pq": SourceConfig(source="files", path=str(tmp_path / "pq"), format="parquet", weight=0.2),
    }


def single(spec: SourceConfig, **kw) -> DataConfig:
    return DataConfig(
        logical_shards=1, source=spec.source, path=spec.path, format=spec.format, **kw
    )


def pipeline(cfg: DataConfig, seed: int = 0) -> TextBatches:
    return TextBatches(cfg, ByteTokenizer(), batch_size=4, seed=seed)


def assert_resumes_exactly(cfg: DataConfig, n: int = N, seed: int = 7):
    fresh = pipeline(cfg, seed)
    expected, states = [], []
    for _ in range(n):
        states.append(fresh.state_dict())  # the position after the batches so far
        expected.append(next(fresh))
    fresh.close()
    for k in range(n):
        restored = pipeline(cfg, seed)
        restored.load_state_dict(json.loads(json.dumps(states[k])))  # as written to disk
        for i in range(k, n):
            got = next(restored)
            assert got.keys() == expected[i].keys()
            for key in got:
                assert torch.equal(got[key], expected[i][key]), f"batch {i} {key}, resumed at {k}"
        restored.close()
    return fresh


@pytest.mark.parametrize("packing", ["concat", "document", "pad"])
@pytest.mark.parametrize("source", ["json", "parquet"])
def test_every_packing_resumes_exactly(corpus, packing, source):
    spec = corpus["json" if source == "json" else "pq"]
    # 40 rows of 16 tokens: several passes over the source, resumed after every batch
    fresh = assert_resumes_exactly(single(spec, packing=packing, block_size=16))
    assert fresh.epoch >= 1


def test_a_shuffled_mixture_resumes_exactly(corpus):
    cfg = DataConfig(
        logical_shards=1,
        sources=list(corpus.values()),
        packing="document",
        block_size=16,
        shuffle_buffer=6,
    )
    fresh = assert_resumes_exactly(cfg, n=12)
    assert min(r.epoch for r in fresh.readers) >= 1  # every source restarted at least once


def test_documents_cut_into_pieces_resume_exactly_mid_document(corpus):
    # pieces of at most 7 characters: most documents are several pieces, and the saved
    # positions fall between the pieces of one document (its rest is in the state)
    cfg = DataConfig(
        logical_shards=1,
        sources=list(corpus.values()),
        block_size=16,
        shuffle_buffer=4,
        max_doc_chars=7,
    )
    fresh = pipeline(cfg)
    held = []
    for _ in range(N):
        next(fresh)
        held += [p for s in fresh.state_dict()["shards"]["0"]["sources"] for p in s["pieces"]]
    fresh.close()
    assert held and all(0 < len(p) <= 7 for p in held)
    assert_resumes_exactly(cfg)


def test_a_resumed_pipeline_saves_a_position_that_resumes_again(corpus):
    cfg = DataConfig(
        logical_shards=1, sources=list(corpus.values()), block_size=16, shuffle_buffer=3
    )
    reference = pipeline(cfg)
    expected = [next(reference) for _ in range(9)]
    first = pipeline(cfg)
    for _ in range(3):
        next(first)
    second = pipeline(cfg)
    second.load_state_dict(first.state_dict())
    for _ in range(3):
        next(second)
    third = pipeline(cfg)
    third.load_state_dict(second.state_dict())
    assert third.batches == 6
    for i in range(6, 9):
        assert torch.equal(next(third)["input_ids"], expected[i]["input_ids"])


def test_a_state_kept_in_memory_does_not_change_as_the_pipeline_goes_on(corpus):
    # A prefetching loader keeps the states of the batches in flight (trainers/data_position.py)
    cfg = DataConfig(
        logical_shards=1, sources=[corpus["json"], corpus["pq"]], block_size=16, shuffle_buffer=3
    )
    p = pipeline(cfg)
    next(p)
    kept = p.state_dict()
    written = json.dumps(kept)
    for _ in range(8):  # several passes over both sources
        next(p)
    assert json.dumps(kept) == written


def test_the_state_is_plain_json_that_names_its_parts(corpus):
    cfg = DataConfig(
        logical_shards=1, sources=[corpus["txt"], corpus["json"]], block_size=16, shuffle_buffer=2
    )
    p = pipeline(cfg)
    next(p)
    state = json.loads(json.dumps(p.state_dict()))  # plain JSON data
    assert set(state) == {"version", "config", "batches", "micro", "epoch", "shards"}
    assert state["batches"] == 1 and state["config"]["block_size"] == 16
    assert state["config"]["logical_shards"] == 1 and list(state["shards"]) == ["0"]
    shard = state["shards"]["0"]
    assert set(shard) == {"sources", "mixture", "shuffle", "packing"}
    assert len(shard["sources"]) == 2
    assert set(shard["sources"][0]) == {
        "epoch",
        "docs",
        "rows",
        "skipped",
        "bad_in_pass",
        "stream",
        "pieces",
    }
    assert set(shard["mixture"]) == {"block", "offset"} and len(shard["shuffle"]["items"]) == 2


def test_the_packing_buffer_holds_exactly_the_tokens_read_but_not_yet_yielded(corpus):
    p = pipeline(single(corpus["json"], block_size=16))
    first = next(p)["input_ids"].flatten().tolist()
    state = p.state_dict()["shards"]["0"]
    docs = state["sources"][0]["docs"]  # read so far, in the first pass
    stream = [t for i in range(docs) for t in list(doc("j", i).encode()) + [ByteTokenizer.eos_id]]
    assert stream[:64] == first
    held = [t for piece in state["packing"]["pieces"] for t in piece][state["packing"]["head"] :]
    assert held == stream[64:]


def test_a_state_from_another_config_is_refused(corpus):
    saved = pipeline(single(corpus["json"], block_size=16, packing="concat"))
    next(saved)
    other = pipeline(single(corpus["json"], block_size=16, packing="document"))
    with pytest.raises(ConfigError, match=r"saved with data.packing='concat', this run has 'doc"):
        other.load_state_dict(saved.state_dict())
    reseeded = pipeline(single(corpus["json"], block_size=16), seed=1)
    with pytest.raises(ConfigError, match=r"saved with seed=0, this run has 1"):
        reseeded.load_state_dict(saved.state_dict())
