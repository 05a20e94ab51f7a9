"""Data errors name the file and the row within it, in the user's words, at start-up when the
first rows of any file show them; data.on_bad_row=skip trains past rows without text."""

from __future__ import annotations

import json
import logging

import pytest

from data.config import DataConfig
from data.pipeline import TextBatches
from data.row_checks import SCAN_ROWS
from data.tokenizers import ByteTokenizer
from torchprime.errors import ConfigError


def jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def batches(tmp_path, **keys) -> TextBatches:
    cfg = DataConfig(
        logical_shards=1, source="files", path=str(tmp_path), format="json", block_size=16, **keys
    )
    return TextBatches(cfg, ByteTokenizer(), batch_size=2)


def test_files_whose_columns_differ_fail_at_start_up_naming_the_file_and_the_columns(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    jsonl(tmp_path / "b.jsonl", [{"text": "three", "lang": "en"}])
    with pytest.raises(ConfigError) as e:
        batches(tmp_path)  # before any batch
    assert f"{tmp_path / 'b.jsonl'}, row 1: columns differ from the first file's" in str(e.value)
    assert "adds lang" in str(e.value)


def test_bytes_that_are_not_utf8_are_named_with_their_offset(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xff here"}\n')
    with pytest.raises(ConfigError, match=r"a.jsonl, row 2: bytes that are not UTF-8 at offset 29"):
        batches(tmp_path)


def test_a_bad_row_past_the_scan_names_its_file_and_its_row_in_that_file(tmp_path):
    rows = [{"text": f"doc {i}"} for i in range(30)]
    rows[SCAN_ROWS + 11] = {"text": 7}
    jsonl(tmp_path / "a.jsonl", rows)
    jsonl(tmp_path / "b.jsonl", [{"text": f"doc {i}"} for i in range(30)])
    data = batches(tmp_path)  # the first rows of every file are fine
    with pytest.raises(ConfigError) as e:
        for _ in range(100):
            next(data)
    message = str(e.value)
    assert (
        f"{tmp_path / 'a.jsonl'}, row {SCAN_ROWS + 12}: field 'text' holds a number (7)" in message
    )
    assert "data.on_bad_row=skip" in message


def test_skip_leaves_rows_out_logs_file_and_row_and_counts_them(tmp_path, caplog):
    rows = [{"text": f"doc {i}"} for i in range(20)]
    rows[3], rows[15] = {"text": None}, {"text": 1.5}
    jsonl(tmp_path / "a.jsonl", rows)
    data = batches(tmp_path, on_bad_row="skip", max_bad_rows=5)
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        for _ in range(4):  # one pass of the file: 18 documents of 6 bytes and an EOS
            next(data)
    assert data.skipped_rows == 2
    logged = [r.getMessage() for r in caplog.records]
    assert any("a.jsonl, row 4: field 'text' is null" in m for m in logged)
    assert any("a.jsonl, row 16: field 'text' holds a number (1.5)" in m for m in logged)


def test_skip_stops_after_max_bad_rows(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": "fine"}] + [{"text": None}] * 5 + [{"text": "x"}])
    data = batches(tmp_path, on_bad_row="skip", max_bad_rows=2)
    with pytest.raises(ConfigError, match=r"3 bad rows skipped, more than data.max_bad_rows=2"):
        for _ in range(20):
            next(data)


def test_a_truncated_parquet_file_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["c", "d"]}), tmp_path / "b.parquet")
    whole = (tmp_path / "b.parquet").read_bytes()
    (tmp_path / "b.parquet").write_bytes(whole[: len(whole) // 2])
    cfg = DataConfig(
        logical_shards=1, source="files", path=str(tmp_path), format="parquet", block_size=16
    )
    with pytest.raises(ConfigError, match=r"b.parquet: not a readable Parquet file"):
        TextBatches(cfg, ByteTokenizer(), batch_size=2)


def test_skip_does_not_pass_a_file_whose_columns_differ(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": None}, {"text": "fine"}])
    jsonl(tmp_path / "b.jsonl", [{"body": "x"}])
    with pytest.raises(
        ConfigError, match=r"b.jsonl, row 1: columns differ .* lacks text; adds body"
    ):
        batches(tmp_path, on_bad_row="skip")
