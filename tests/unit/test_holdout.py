"""The held-out share of the training data (eval.holdout): a function of each document, the
same on every host count, never read by training; the eval batches cut from it, and the
errors of bad held-out input."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import composed
from data.config import DataConfig, SourceConfig
from data.eval_batches import cut_eval_batches, eval_data_config, training_holdout
from data.holdout import Holdout, holdout_score
from data.pipeline import TextBatches
from data.sources import SourceReader
from data.tokenizers import ByteTokenizer
from torchprime.errors import ConfigError
from trainers.eval_config import EvalConfig

N_DOCS = 120
FRACTION = 0.2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """120 text files of one document each, and the same documents as JSON lines."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [f"document {i}: " + "word " * (5 + i % 7) for i in range(N_DOCS)]
    (root / "txt").mkdir()
    for i, doc in enumerate(docs):
        (root / "txt" / f"{i:03d}.txt").write_text(doc)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root, docs


def one_pass(spec: SourceConfig, holdout: Holdout, host: int, hosts: int) -> list[str]:
    """The documents a host's reader gives in one pass over its part."""
    reader, texts = SourceReader(spec, "data", host, hosts, holdout), []
    while True:
        text = reader.next_text()
        if reader.epoch:
            reader.close()
            return texts
        texts.append(text)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_held_out_documents_are_the_same_on_any_host_count_and_never_trained_on(corpus, fmt):
    root, docs = corpus
    path = str(root / ("txt" if fmt == "text" else "docs.jsonl"))
    spec = SourceConfig(source="files", path=path, format=fmt)
    held, train = Holdout(FRACTION, held_out=True), Holdout(FRACTION, held_out=False)
    expected = {d for d in docs if holdout_score(d) < FRACTION}
    assert 0 < len(expected) < N_DOCS * 0.5
    # Text files split by whole files, the JSON lines file (one shard) by every n-th row.
    for hosts in (1, 2, 3, 4):
        parts = [one_pass(spec, held, h, hosts) for h in range(hosts)]
        trained = [one_pass(spec, train, h, hosts) for h in range(hosts)]
        evaluated = [d for part in parts for d in part]
        assert sorted(evaluated) == sorted(expected), hosts
        seen = [d for part in trained for d in part]
        assert not set(seen) & set(evaluated)
        assert sorted(seen + evaluated) == sorted(docs)  # every document on exactly one side


def test_the_training_stream_never_yields_held_out_text(corpus):
    root, docs = corpus
    cfg = DataConfig(
        logical_shards=1, source="files", path=str(root / "txt"), block_size=8, shuffle_buffer=5
    )
    eval_cfg = EvalConfig(holdout=FRACTION)
    batches = TextBatches(cfg, ByteTokenizer(), 4, seed=7, holdout=training_holdout(eval_cfg))
    text = b""
    while batches.epoch < 2:
        text += bytes(t for t in next(batches)["input_ids"].flatten().tolist() if t < 256)
    for doc in docs:
        assert (doc.encode() in text) == (holdout_score(doc) >= FRACTION)


def test_eval_batches_are_cut_the_same_whatever_the_seed_and_shuffle(corpus):
    root, _ = corpus
    eval_cfg = EvalConfig(holdout=FRACTION, steps=2)
    a = cut_eval_batches(
        eval_cfg,
        DataConfig(logical_shards=1, source="files", path=str(root / "txt"), block_size=8),
        ByteTokenizer(),
        2,
    )
    shuffled = DataConfig(
        logical_shards=1, source="files", path=str(root / "txt"), block_size=8, shuffle_buffer=9
    )
    b = cut_eval_batches(eval_cfg, shuffled, ByteTokenizer(), 2)
    assert len(a) == 2 and all(x["input_ids"].equal(y["input_ids"]) for x, y in zip(a, b))


def test_eval_data_reads_its_own_sources_with_the_training_tokenization(corpus):
    root, _ = corpus
    cfg = composed(
        "eval.data.source=files",
        f"eval.data.path={root / 'docs.jsonl'}",
        "eval.data.format=json",
        "data.block_size=32",
    )
    data, holdout, key = eval_data_config(cfg.eval, cfg.data)
    assert (data.source, data.path, data.format, data.block_size) == (
        "files",
        str(root / "docs.jsonl"),
        "json",
        32,
    )
    assert holdout is None and key == "eval.data" and data.shuffle_buffer == 0
    assert training_holdout(cfg.eval) is None  # with eval.data, training reads everything


def test_the_default_run_shuffles_documents_and_holds_out_a_share():
    cfg = composed()
    assert cfg.data.shuffle_buffer > 0
    assert cfg.data.max_doc_chars > 0  # long stdlib files spread as pieces, not rows in a row
    assert cfg.eval.holdout == 0.01 and cfg.eval.interval == 50 and cfg.eval.at_end


def test_more_eval_steps_than_the_held_out_data_holds_says_how_many_it_holds(corpus):
    root, _ = corpus
    data = DataConfig(logical_shards=1, source="files", path=str(root / "txt"), block_size=8)
    with pytest.raises(
        ConfigError,
        match=r"eval.steps=500 is more than the held-out data "
        r"\(eval.holdout\) can fill: it holds \d+ batches of 2 rows",
    ):
        cut_eval_batches(EvalConfig(holdout=FRACTION, steps=500), data, ByteTokenizer(), 2)


def test_a_holdout_that_holds_no_document_names_the_key(corpus):
    root, docs = corpus
    tiny = min(holdout_score(d) for d in docs) / 2
    data = DataConfig(logical_shards=1, source="files", path=str(root / "txt"), block_size=8)
    with pytest.raises(
        ConfigError,
        match=r"eval.holdout: files .* no documents on the "
        r"held-out side of eval.holdout=",
    ):
        cut_eval_batches(EvalConfig(holdout=tiny), data, ByteTokenizer(), 2)


def test_a_missing_eval_source_names_eval_data(tmp_path):
    cfg = EvalConfig()
    cfg.data.source, cfg.data.path = "files", str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="eval.data.path=.*nothing.*no text files there"):
        cut_eval_batches(cfg, DataConfig(logical_shards=1), ByteTokenizer(), 2)


@pytest.mark.parametrize("value", ["0", "0.6", "-0.1"])
def test_a_holdout_outside_the_range_is_named(value):
    problems = composed(f"eval.holdout={value}").problems()
    assert f"eval.holdout={float(value)}: must be in (0, 0.5] (null: none)." in problems


def test_bad_eval_keys_are_named_at_once():
    cfg = composed("eval.holdout=null", "eval.interval=0", "eval.steps=0", "eval.data.source=files")
    problems = "\n".join(cfg.problems())
    for key in ("eval.interval=0", "eval.steps=0", "eval.data.source=files needs eval.data.path"):
        assert key in problems


def test_every_host_count_evaluates_the_same_rows(corpus):
    root, _ = corpus
    data = DataConfig(logical_shards=1, source="files", path=str(root / "txt"), block_size=8)
    cfg = EvalConfig(holdout=FRACTION, steps=2)
    whole = cut_eval_batches(cfg, data, ByteTokenizer(), 12)
    for hosts in (2, 3, 4):
        parts = [
            cut_eval_batches(cfg, data, ByteTokenizer(), 12 // hosts, h, hosts)
            for h in range(hosts)
        ]
        for i, batch in enumerate(whole):
            joined = torch.cat([part[i]["input_ids"] for part in parts])
            assert joined.equal(batch["input_ids"]), hosts


def test_the_pre_flight_names_an_eval_batch_the_devices_cannot_split_and_too_many_steps():
    from run.preflight import Devices, preflight

    devices = Devices(kind="CPU", count=4)
    pre = preflight(composed("eval.batch_size=6"), devices)
    assert pre.problems == [
        "eval.batch_size=6 does not split over the 4 data-parallel devices (data x fsdp) of mesh "
        "fsdp=4: it must be a multiple of 4."
    ]
    pre = preflight(composed("eval.steps=1000"), devices)
    assert len(pre.problems) == 1
    assert pre.problems[0].startswith(
        "eval.steps=1000 is more than the held-out data (eval.holdout) can fill: it holds 66 "
        "batches of 8 rows"
    )
