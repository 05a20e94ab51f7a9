"""The input pipeline: byte tokenizer, packing, streaming sources split by host, batches."""

from __future__ import annotations

import pytest
import torch

from data.config import DataConfig
from data.packing import pack_concat
from data.pipeline import TextBatches
from data.sources import host_texts, stdlib_files
from data.tokenizers import ByteTokenizer
from torchprime.errors import ConfigError


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "déjà vu → 東京 🚀"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258} and tok.vocab_size == 259


def test_concat_packing_joins_documents_with_eos_and_cuts_exact_rows():
    rows = list(pack_concat([[1, 2, 3], [4], [5, 6, 7, 8, 9]], block_size=4, eos_id=0))
    # stream: 1 2 3 0 4 0 5 6 7 8 9 0 -> three rows, nothing left over
    assert rows == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]]
    assert list(pack_concat([[1, 2]], block_size=4, eos_id=0)) == []  # a partial row waits


def test_the_default_corpus_is_the_python_standard_library():
    files = stdlib_files()
    assert len(files) > 200 and files == sorted(files)
    assert any(f.endswith("/json/decoder.py") for f in files)
    assert not any("/site-packages/" in f or "/test/" in f for f in files)


def write_corpus(tmp_path, n):
    for i in range(n):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n")
    return DataConfig(source="files", path=str(tmp_path), format="text")


@pytest.mark.parametrize("n_files", [8, 7])  # split by files (8 = 4 x 2), by examples (7)
def test_hosts_read_disjoint_parts_that_cover_the_source(tmp_path, n_files):
    cfg = write_corpus(tmp_path, n_files)
    parts = [list(host_texts(cfg, rank, 4)) for rank in range(4)]
    every = [t for part in parts for t in part]
    assert sorted(every) == sorted(f"document number {i}\n" for i in range(n_files))
    assert len(every) == len(set(every))


def test_batches_have_the_host_batch_shape_and_labels_equal_inputs():
    cfg = DataConfig(block_size=64)
    batch = next(iter(TextBatches(cfg, ByteTokenizer(), batch_size=3)))
    assert batch["input_ids"].shape == (3, 64) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])
    first = ByteTokenizer().decode(batch["input_ids"][0].tolist())
    assert first.startswith('"""Record of phased-in incompatible language changes.')


def test_batches_continue_past_the_end_of_the_source(tmp_path):
    cfg = write_corpus(tmp_path, 2)
    cfg.block_size = 8
    batches = TextBatches(cfg, ByteTokenizer(), batch_size=4)
    it = iter(batches)
    for _ in range(5):  # 38 tokens a pass → 4 rows a pass, 20 rows needed
        next(it)
    assert batches.epoch >= 4


def test_a_missing_path_names_it(tmp_path):
    cfg = DataConfig(source="files", path=str(tmp_path / "nowhere"), format="text")
    with pytest.raises(ConfigError, match="nowhere"):
        TextBatches(cfg, ByteTokenizer(), batch_size=1)


def test_a_missing_text_field_names_it_and_the_fields_there_are(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"content": "hello"}\n')
    cfg = DataConfig(source="files", path=str(tmp_path), format="json")
    with pytest.raises(ConfigError, match=r"text_field='text'.*fields: content"):
        list(host_texts(cfg, 0, 1))


def test_a_source_shorter_than_one_row_is_an_error(tmp_path):
    cfg = write_corpus(tmp_path, 1)
    cfg.block_size = 4096
    with pytest.raises(ConfigError, match="less than one row of data.block_size=4096"):
        next(iter(TextBatches(cfg, ByteTokenizer(), batch_size=1)))
