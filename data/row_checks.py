"""What is wrong with a data file's rows, said in the user's words and naming the file and the
row within it (1-based, as an editor counts lines).

`datasets` reads JSON lines and Parquet in blocks and reports a bad row as a CastError or a
UnicodeDecodeError naming no file, or as a row index counted across the whole source. These
checks read the files themselves, with the standard library and pyarrow:
- at start-up, the first rows of every file (`scan_first_rows`): a folder whose files disagree
  on their columns, a file that is not JSON or not Parquet, a missing or non-text field, bytes
  that are not UTF-8 fail before step 1, in well under a second per thousand files;
- when reading fails later, the rows in file order up to the first bad one (`find_bad_rows`),
  to say which file and row it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: Rows of every file read by the start-up scan.
SCAN_ROWS = 8


@dataclass(frozen=True)
class BadRow:
    file: str
    row: int
    """1-based: the line of a JSON-lines file, the row of a Parquet file."""
    problem: str
    """What is wrong, e.g. "has no field 'text' (fields: body)"."""
    row_level: bool = False
    """A row without text that `datasets` still delivers (on_bad_row=skip can pass it), as
    opposed to a file-level problem (columns, encoding, syntax) that stops the reading."""

    def __str__(self) -> str:
        where = f"{self.file}, row {self.row}" if self.row else self.file
        return f"{where}: {self.problem}"


def row_problem(row: Any, text_field: str) -> str | None:
    """What keeps `row` from giving a document, or None."""
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object with a {text_field!r} field"
    if text_field not in row:
        return f"has no field {text_field!r} (fields: {', '.join(row) or 'none'})"
    value = row[text_field]
    if value is None:
        return f"field {text_field!r} is null, not text"
    if not isinstance(value, str):
        kind = "a number" if isinstance(value, int | float) else f"a {type(value).__name__}"
        return f"field {text_field!r} holds {kind} ({_short(value)}), not text"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_rows(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(line, row, problem) of each non-blank line; a line that cannot be read has row None."""
    with open(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    number,
                    None,
                    f"bytes that are not UTF-8 at offset {start + e.start} of the file",
                )
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as e:
                yield number, None, f"not valid JSON ({e.msg}, column {e.colno})"


def _parquet_rows(
    path: str, text_field: str, limit: int | None
) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        yield 0, None, f"not a readable Parquet file ({e})"
        return
    columns = file.schema_arrow.names
    # Only the text column is read (others may be large, images say); a row lists every
    # column of the schema, for the comparison of columns.
    if text_field not in columns and file.metadata.num_rows:
        yield 1, dict.fromkeys(columns), None  # every row lacks it: the first says so
        return
    number = 0
    try:
        for batch in file.iter_batches(batch_size=limit or 8192, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                number += 1
                yield number, {**dict.fromkeys(columns), text_field: text}, None
                if limit is not None and number >= limit:
                    return
    except Exception as e:  # noqa: BLE001
        yield number + 1, None, f"unreadable from row {number + 1} on ({e})"
    if number == 0:
        yield 0, dict.fromkeys(columns), "no rows"  # its columns still count


def _rows(path: str, fmt: str, text_field: str, limit: int | None = None):
    if fmt == "parquet":
        yield from _parquet_rows(path, text_field, limit)
        return
    for n, (number, row, problem) in enumerate(_json_rows(path), start=1):
        yield number, row, problem
        if limit is not None and n >= limit:
            return


def _column_difference(first_file: str, first: list[str], here: list[str]) -> str | None:
    missing = [c for c in first if c not in here]
    extra = [c for c in here if c not in first]
    if not missing and not extra:
        return None
    parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
        [f"adds {', '.join(extra)}"] if extra else []
    )
    return f"columns differ from the first file's ({first_file}: {', '.join(first)}): " + (
        "; ".join(parts)
    )


def find_bad_rows(
    files: list[str], fmt: str, text_field: str, limit: int | None = None
) -> Iterator[BadRow]:
    """The bad rows of `files` in order (the first `limit` rows of each file, or all).

    Columns: `datasets` takes them from the first file and fails on a block of another file
    whose columns differ. The columns of a file are those of its first SCAN_ROWS rows (JSON
    rows may leave out keys; Parquet has a schema); a later row with a column the first
    file lacks is named as well."""
    if fmt not in ("json", "parquet"):
        return
    first: list[str] | None = None
    for path in files:
        columns: list[str] = []
        compared = False
        for number, row, problem in _rows(path, fmt, text_field, limit):
            if row is not None:
                columns += [c for c in row if c not in columns]
                if problem == "no rows":
                    break
                if compared and first is not None:
                    extra = [c for c in row if c not in first]
                    if extra:
                        problem = _column_difference(files[0], first, first + extra)
                if (row_level := row_problem(row, text_field)) is not None:
                    yield BadRow(path, number, row_level, row_level=True)
                    continue
            if number >= SCAN_ROWS and not compared:
                compared, problem = True, _compare(files[0], first, columns, path) or problem
                first = first or columns
            if problem is not None:
                yield BadRow(path, number, problem)
                if row is None and fmt == "parquet":
                    break  # the rest of a damaged Parquet file cannot be read
        if not compared and columns:
            if (difference := _compare(files[0], first, columns, path)) is not None:
                yield BadRow(path, 1, difference)
            first = first or columns


def _compare(first_file: str, first: list[str] | None, columns: list[str], path: str):
    if first is None or path == first_file:
        return None
    return _column_difference(first_file, first, columns)


def scan_first_rows(files: list[str], fmt: str, text_field: str) -> BadRow | None:
    """The first bad row among the first SCAN_ROWS rows of every file, or None."""
    return next(find_bad_rows(files, fmt, text_field, limit=SCAN_ROWS), None)
