"""The input pipeline: byte tokenizer, packing, collation, streaming sources split by host,
batches, and the errors a user gets for bad data config."""

from __future__ import annotations

import json

import pytest
import torch

from collators import get_collator
from data.config import DataConfig, SourceConfig
from data.packing import build_packer
from data.pipeline import TextBatches
from data.sources import host_texts, stdlib_files
from data.tokenizers import ByteTokenizer, build_tokenizer
from torchprime.errors import ConfigError

EOS, PAD = 0, 99


def pack(packing, docs, block_size):
    """Rows a packer makes from `docs` (each already ending in EOS) until they run out."""
    packer, it, rows = build_packer(packing, block_size, PAD), iter(docs), []
    try:
        while True:
            rows.append(packer.next_row(lambda: next(it)))
    except StopIteration:
        return rows


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "déjà vu → 東京 🚀"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258} and tok.vocab_size == 259


DOCS = [[1, 2, 3, EOS], [4, EOS], [5, 6, 7, 8, 9, EOS]]


def test_concat_packing_joins_documents_and_cuts_exact_rows():
    # stream: 1 2 3 0 4 0 5 6 7 8 9 0 -> three rows, nothing left over
    rows = pack("concat", DOCS, 4)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]]
    assert pack("concat", [[1, EOS]], 4) == []  # a partial row waits for more


def test_document_packing_numbers_segments_and_restarts_positions_in_each_row():
    rows = pack("document", DOCS, 5)
    # 1 2 3 0 | 4   then   0 | 5 6 7 8   (the 9 0 tail waits)
    assert rows[0] == {
        "input_ids": [1, 2, 3, 0, 4],
        "segment_ids": [1, 1, 1, 1, 2],
        "position_ids": [0, 1, 2, 3, 0],
    }
    # the cut document's EOS continues in the next row as a new segment from position 0
    assert rows[1] == {
        "input_ids": [0, 5, 6, 7, 8],
        "segment_ids": [1, 2, 2, 2, 2],
        "position_ids": [0, 0, 1, 2, 3],
    }
    assert len(rows) == 2


def test_pad_packing_puts_one_document_in_each_row():
    rows = pack("pad", DOCS, 5)
    assert [r["input_ids"] for r in rows] == [
        [1, 2, 3, 0, PAD],
        [4, 0, PAD, PAD, PAD],
        [5, 6, 7, 8, 9],
    ]
    assert [r["attention_mask"] for r in rows] == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1] * 5]


def test_document_labels_never_cross_documents_and_pad_labels_skip_padding():
    collate = get_collator("causal_lm")
    batch = collate(pack("document", DOCS, 5))
    assert set(batch) == {"input_ids", "labels", "position_ids", "segment_ids"}
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in batch.values())
    # a segment's first token is not a target of the previous segment's last position
    assert batch["labels"].tolist() == [[1, 2, 3, 0, -100], [0, -100, 6, 7, 8]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 2], [1, 2, 2, 2, 2]]
    padded = collate(pack("pad", DOCS, 5))
    assert set(padded) == {"input_ids", "labels"}
    assert padded["labels"].tolist() == [
        [1, 2, 3, 0, -100],
        [4, 0, -100, -100, -100],
        [5, 6, 7, 8, 9],
    ]
    concat = collate(pack("concat", DOCS, 4))
    assert set(concat) == {"input_ids", "labels"}
    assert torch.equal(concat["labels"], concat["input_ids"])


def test_the_default_corpus_is_the_python_standard_library():
    files = stdlib_files()
    assert len(files) > 200 and files == sorted(files)
    assert any(f.endswith("/json/decoder.py") for f in files)
    assert not any("/site-packages/" in f or "/test/" in f for f in files)


def write_corpus(tmp_path, n, tag="document number"):
    tmp_path.mkdir(exist_ok=True)
    for i in range(n):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"{tag} {i}\n")
    return DataConfig(logical_shards=1, source="files", path=str(tmp_path), format="text")


@pytest.mark.parametrize("n_files", [8, 7])  # split by files (8 = 4 x 2), by examples (7)
def test_hosts_read_disjoint_parts_that_cover_the_source(tmp_path, n_files):
    cfg = write_corpus(tmp_path, n_files)
    parts = [list(host_texts(cfg, rank, 4)) for rank in range(4)]
    every = [t for part in parts for t in part]
    assert sorted(every) == sorted(f"document number {i}\n" for i in range(n_files))
    assert len(every) == len(set(every))


def test_logical_shards_of_a_mixture_read_disjoint_parts_of_every_source(tmp_path):
    # source a: 8 files (split by files), source b: 6 JSON lines in 1 file (split by examples);
    # 4 hosts, one logical shard each
    write_corpus(tmp_path / "a", 8, tag="a")
    lines = [json.dumps({"text": f"b {i}"}) + "\n" for i in range(6)]
    (tmp_path / "b.jsonl").write_text("".join(lines))
    cfg = DataConfig(
        logical_shards=4,
        sources=[
            SourceConfig(source="files", path=str(tmp_path / "a"), weight=1),
            SourceConfig(source="files", path=str(tmp_path / "b.jsonl"), format="json", weight=1),
        ],
        packing="pad",
        block_size=8,
    )
    tok = ByteTokenizer()
    seen = []
    for rank in range(4):
        # 40 rows: many passes over this host's part of both sources (2 + 1 or 2 documents)
        batch = next(TextBatches(cfg, tok, batch_size=40, process_index=rank, process_count=4))
        seen.append({tok.decode(r).strip() for r in batch["input_ids"].tolist()})
    assert all(not (seen[i] & seen[j]) for i in range(4) for j in range(i + 1, 4))
    assert set().union(*seen) == {f"a {i}" for i in range(8)} | {f"b {i}" for i in range(6)}


def test_batches_have_the_host_batch_shape_and_labels_equal_inputs():
    cfg = DataConfig(logical_shards=1, block_size=64)
    batch = next(iter(TextBatches(cfg, ByteTokenizer(), batch_size=3)))
    assert batch["input_ids"].shape == (3, 64) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])
    first = ByteTokenizer().decode(batch["input_ids"][0].tolist())
    assert first.startswith('"""Record of phased-in incompatible language changes.')


def test_add_bos_starts_every_document_with_bos(tmp_path):
    cfg = write_corpus(tmp_path, 2)  # "document number 0\n": 18 bytes
    cfg.block_size, cfg.packing, cfg.add_bos = 20, "pad", True
    tok = ByteTokenizer()
    ids = next(TextBatches(cfg, tok, batch_size=2))["input_ids"].tolist()
    assert [row[0] for row in ids] == [tok.bos_id] * 2
    assert [row[19] for row in ids] == [tok.eos_id] * 2  # BOS + 18 bytes + EOS fill the row


def test_batches_continue_past_the_end_of_the_source(tmp_path):
    cfg = write_corpus(tmp_path, 2)
    cfg.block_size = 8
    batches = TextBatches(cfg, ByteTokenizer(), batch_size=4)
    it = iter(batches)
    for _ in range(5):  # 38 tokens a pass → 4.75 rows a pass, 20 rows needed
        next(it)
    assert batches.epoch == 4  # 20 rows = 160 tokens: the 5th pass has begun


def test_empty_documents_are_skipped(tmp_path):
    cfg = write_corpus(tmp_path, 2)
    (tmp_path / "doc00.txt").write_text("")
    cfg.block_size, cfg.packing = 20, "pad"
    tok = ByteTokenizer()
    rows = next(TextBatches(cfg, tok, batch_size=2))["input_ids"].tolist()
    assert [tok.decode(r) for r in rows] == ["document number 1\n"] * 2


# -- what a user gets for bad data config ---------------------------------------------------


def test_a_missing_path_names_it(tmp_path):
    cfg = DataConfig(
        logical_shards=1, source="files", path=str(tmp_path / "nowhere"), format="text"
    )
    with pytest.raises(ConfigError, match=r"data.path=.*nowhere.*no text files"):
        TextBatches(cfg, ByteTokenizer(), batch_size=1)


def test_a_missing_path_in_a_mixture_names_the_source_entry(tmp_path):
    write_corpus(tmp_path, 1)
    cfg = DataConfig(
        logical_shards=1,
        sources=[
            SourceConfig(path=str(tmp_path)),
            SourceConfig(path=str(tmp_path / "*.jsonl"), format="json"),
        ],
    )
    with pytest.raises(ConfigError, match=r"data.sources\[1\].path=.*\*.jsonl.*no json files"):
        TextBatches(cfg, ByteTokenizer(), batch_size=1)


def test_a_missing_text_field_names_it_and_the_fields_there_are(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"content": "hello"}\n')
    cfg = DataConfig(logical_shards=1, source="files", path=str(tmp_path), format="json")
    with pytest.raises(ConfigError, match=r"text_field='text'.*fields: content"):
        list(host_texts(cfg, 0, 1))
    with pytest.raises(ConfigError, match=r"data.text_field='text': .*rows.jsonl, row 1: has no"):
        TextBatches(cfg, ByteTokenizer(), batch_size=1)  # checked before any training


def test_a_row_that_is_not_text_is_an_error(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"text": 42}\n')
    cfg = DataConfig(
        logical_shards=1, source="files", path=str(tmp_path), format="json", block_size=64
    )
    with pytest.raises(ConfigError, match=r"rows.jsonl, row 2: field 'text' holds a number \(42\)"):
        next(TextBatches(cfg, ByteTokenizer(), batch_size=1))


def test_a_malformed_file_is_an_error_naming_the_source(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    cfg = DataConfig(logical_shards=1, source="files", path=str(tmp_path), format="json")
    with pytest.raises(ConfigError, match=r"data: .*rows.jsonl, row 2: not valid JSON"):
        TextBatches(cfg, ByteTokenizer(), batch_size=1)


def test_an_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": ""}\n')
    cfg = DataConfig(logical_shards=1, source="files", path=str(tmp_path), format="json")
    with pytest.raises(ConfigError, match=r"data: files \S+ gives no documents"):
        TextBatches(cfg, ByteTokenizer(), batch_size=1)


def test_a_source_shorter_than_one_row_is_an_error(tmp_path):
    cfg = write_corpus(tmp_path, 1)
    cfg.block_size = 4096
    with pytest.raises(ConfigError, match="less than one row of data.block_size=4096"):
        next(iter(TextBatches(cfg, ByteTokenizer(), batch_size=1)))


def test_every_problem_of_the_data_block_is_named_at_once():
    cfg = DataConfig(
        logical_shards=1,
        collator="seq2seq",
        shuffle_buffer=-1,
        block_size=1,
        sources=[SourceConfig(source="stdlib", weight=0), SourceConfig(source="hub")],
    )
    assert cfg.problems() == [
        "data.sources[0].weight=0: must be a positive number.",
        "data.sources[1].source=hub needs data.sources[1].path, the dataset's name on the hub.",
        "data.shuffle_buffer=-1: must be 0 (off) or more.",
        "data.block_size=1: must be at least 2.",
        "data.collator='seq2seq': known collators are causal_lm.",
    ]
    assert DataConfig(logical_shards=1, source="files").problems() == [
        "data.source=files needs data.path (a file, folder or glob)."
    ]


def test_an_unknown_tokenizer_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data.tokenizer='sentencepiece': neither a known"):
        build_tokenizer("sentencepiece")
    with pytest.raises(ConfigError, match=r"no tokenizer.json in that folder"):
        build_tokenizer(str(tmp_path))


def test_a_block_longer_than_the_model_context_is_an_error():
    from train_config import TrainConfig

    cfg = TrainConfig()
    cfg.data.block_size = cfg.model.max_position_embeddings + 1
    assert cfg.problems() == [
        "data.block_size=2049 is longer than the model's context, "
        "model.max_position_embeddings=2048."
    ]


def test_packed_documents_are_seen_and_scored_as_if_alone_by_the_model():
    """The keys document packing makes, used as the trainer does (position_ids to the model,
    segment_ids → models.masks.segment_bias): no token attends to or is scored from another
    document."""
    from models import build_model
    from models.llama import LlamaConfig
    from models.masks import segment_bias

    model = build_model(LlamaConfig(), torch.float32).to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    a, b = [72, 101, 108, 108, 111, EOS], [87, 111, 114, 108, 100, 33, 33, EOS]
    batch = get_collator("causal_lm")(pack("document", [a, b], block_size=len(a) + len(b)))
    packed_inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_bias": segment_bias(batch["segment_ids"]),
    }
    with torch.no_grad():
        logits = model(**packed_inputs).logits[0]
        loss = model(**packed_inputs, labels=batch["labels"]).loss
        alone = [model(input_ids=torch.tensor([d])).logits[0] for d in (a, b)]
        losses = [model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss for d in (a, b)]
    assert torch.allclose(logits[: len(a)], alone[0], atol=1e-5)
    assert torch.allclose(logits[len(a) :], alone[1], atol=1e-5)
    # the loss is the mean over both documents' own next tokens (b's first token is not one)
    per_doc = [loss_d * (len(d) - 1) for loss_d, d in zip(losses, (a, b))]
    assert torch.allclose(loss, sum(per_doc) / (len(a) + len(b) - 2), atol=1e-5)
