"""Fault injection: bad data, bad folders, a full disk, damaged checkpoints. Each case runs the
real command (the Hydra entry of train.py, several cases per process: tests/e2e/run_faults.py)
with the tiny model on backend=cpu and asserts the exit status, a message naming the file, key
or value, no Python traceback, and that nothing saved before is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, mounted, read_jsonl

RUN = (
    "backend=cpu",
    "ici_mesh.fsdp=1",
    "trainer.progress_bar=false",
    "trainer.logging_steps=1",
    "trainer.global_batch_size=2",
    "data.block_size=32",
    "eval.holdout=null",  # the small corpora here hold too few documents for a held-out share
    "eval.interval=null",
    # the stdlib group's 4096-piece buffer would read these tiny corpora hundreds of times over
    # before step 1 (each pass skipping its bad row again)
    "data.shuffle_buffer=256",
)


def jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def docs(n: int, tag: str = "doc") -> list[dict]:
    return [{"text": f"{tag} {i}: the quick brown fox jumps over the lazy dog"} for i in range(n)]


def files_source(path: Path, fmt: str = "json") -> tuple[str, ...]:
    return ("data.source=files", f"data.path={path}", f"data.format={fmt}")


def run_cases(cases: list[dict], tmp_path: Path) -> dict[str, dict]:
    spec, results = tmp_path / "cases.json", tmp_path / "results.json"
    spec.write_text(json.dumps(cases))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests/e2e/run_faults.py"), str(spec), str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["name"]: r for r in json.loads(results.read_text())}


def refused(result: dict, code: int, *named: str) -> str:
    """The case's error: exit status `code`, an `error:` message (to the end of stderr)
    naming every `named`, and no Python traceback anywhere on stderr."""
    stderr = result["stderr"]
    assert result["code"] == code, (result["name"], result["code"], stderr[-3000:])
    assert "Traceback" not in stderr, (result["name"], stderr[-3000:])
    assert "\nerror: " in "\n" + stderr, (result["name"], stderr[-3000:])
    message = stderr[("\n" + stderr).index("\nerror: ") :]
    for name in named:
        assert name in message, (result["name"], name, message)
    return message


def test_data_folder_tokenizer_and_checkpoint_faults(tmp_path):
    from tools.train_tokenizer import train_bpe

    good = tmp_path / "good"
    for name in "abc":
        jsonl(good / f"{name}.jsonl", docs(6, name))
    mixed = tmp_path / "mixed"
    jsonl(mixed / "a.jsonl", docs(4))
    jsonl(mixed / "b.jsonl", [{"text": "x", "lang": "en"}])
    utf8 = tmp_path / "utf8" / "a.jsonl"
    utf8.parent.mkdir()
    utf8.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    pq.write_table(pa.table({"text": ["one", "two"]}), parquet / "a.parquet")
    pq.write_table(pa.table({"text": ["three", "four"]}), parquet / "b.parquet")
    whole = (parquet / "b.parquet").read_bytes()
    (parquet / "b.parquet").write_bytes(whole[: len(whole) // 2])
    tokenizer = train_bpe(iter(["the quick brown fox"] * 20), 270, tmp_path / "tok")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tokenizer / name).write_text("{}\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    nulls = jsonl(tmp_path / "nulls" / "a.jsonl", [*docs(2), {"text": None}, *docs(20)])
    reading = tmp_path / "reading"
    for name in "abc":
        jsonl(reading / f"{name}.jsonl", docs(3, name))
    out = tmp_path / "out"
    ckpt = ("trainer.max_steps=4", "trainer.checkpoint.interval=2")
    cases = [
        {
            "name": "glob",
            "args": [*RUN, *files_source(tmp_path / "none*.jsonl"), f"output_dir={out}/g"],
        },
        {"name": "mixed", "args": [*RUN, *files_source(mixed), f"output_dir={out}/m"]},
        {"name": "utf8", "args": [*RUN, *files_source(utf8.parent), f"output_dir={out}/u"]},
        {
            "name": "parquet",
            "args": [*RUN, *files_source(parquet, "parquet"), f"output_dir={out}/p"],
        },
        {"name": "tokenizer", "args": [*RUN, f"data.tokenizer={tokenizer}", f"output_dir={out}/t"]},
        {"name": "output_file", "args": [*RUN, f"output_dir={a_file}"]},
        # fails before step 1, then the corrected command runs in the same folder
        {"name": "null_row", "args": [*RUN, *files_source(nulls.parent), f"output_dir={out}/n"]},
        {
            "name": "null_row_skipped",
            "args": [
                *RUN,
                *files_source(nulls.parent),
                "data.on_bad_row=skip",
                "trainer.max_steps=2",
                f"output_dir={out}/n",
            ],
        },
        {
            "name": "deleted_while_reading",
            "args": [*RUN, *files_source(reading), "trainer.max_steps=8", f"output_dir={out}/r"],
            "at_step": {"2": [["rm", str(reading / "c.jsonl")]]},
        },
        {
            "name": "checkpoints_deleted",
            "args": [*RUN, *files_source(good), *ckpt, f"output_dir={out}/c"],
            "at_step": {"3": [["rm", str(out / "c" / "checkpoints")]]},
        },
        {
            "name": "corrupt_host_json",
            "before": [
                ["write", str(out / "c/checkpoints/step_00000004/host_00000.json"), "{oops"]
            ],
            "args": [
                *RUN,
                *files_source(good),
                *ckpt,
                "trainer.resume=auto",
                f"output_dir={out}/c",
            ],
        },
    ]
    r = run_cases(cases, tmp_path)

    refused(r["glob"], 2, "data.path=", "none*.jsonl", "no json files")
    line = refused(r["mixed"], 2, str(mixed / "b.jsonl"), "row 1", "columns differ", "adds lang")
    assert "To go on" in line
    refused(r["utf8"], 2, str(utf8), "row 2", "not UTF-8 at offset 30")
    refused(r["parquet"], 2, str(parquet / "b.parquet"), "not a readable Parquet file")
    refused(r["tokenizer"], 2, f"data.tokenizer='{tokenizer}'", "names no eos_token")
    refused(r["output_file"], 2, f"output_dir={a_file}", "it is a file, not a folder")
    assert a_file.read_text() == "not a folder\n"

    refused(r["null_row"], 2, str(nulls), "row 3", "is null", "data.on_bad_row=skip")
    assert r["null_row_skipped"]["code"] == 0, r["null_row_skipped"]["stderr"][-3000:]
    records = read_jsonl(out / "n" / "metrics.jsonl")
    assert [x["step"] for x in records] == [1, 2] and records[-1]["skipped_rows"] >= 1
    logged = r["null_row_skipped"]["stdout"] + r["null_row_skipped"]["stderr"]
    assert f"skipped {nulls}, row 3: field 'text' is null" in logged

    refused(r["deleted_while_reading"], 2, str(reading / "c.jsonl"), "moved or deleted")

    # the run saves again after its checkpoints folder went away
    assert r["checkpoints_deleted"]["code"] == 0, r["checkpoints_deleted"]["stderr"][-3000:]
    saved = out / "c" / "checkpoints"
    assert sorted(p.name for p in saved.iterdir()) == ["step_00000004"]
    # a damaged host record: the checkpoint is skipped (named), the run stops, nothing deleted
    line = refused(r["corrupt_host_json"], 2, "trainer.resume=auto", "step_00000004")
    warnings = r["corrupt_host_json"]["stdout"] + r["corrupt_host_json"]["stderr"]
    assert "host_00000.json" in warnings
    assert (saved / "step_00000004" / "host_00000.json").read_text() == "{oops"


def test_read_only_folder_and_full_disk(tmp_path):
    good = tmp_path / "good"
    for name in "ab":
        jsonl(good / f"{name}.jsonl", docs(6, name))
    command = [*RUN, *files_source(good), "trainer.max_steps=4", "trainer.checkpoint.interval=2"]
    # Root ignores permission bits, so a chmod 0o555 folder would not be refused to it: the
    # read-only folder is a read-only bind mount. The full disk is a 16 MiB tmpfs: the first
    # checkpoint of the tiny model (10.1 MiB with its AdamW state) fits, the second does not.
    with (
        mounted(tmp_path / "ro", "bind,ro") as ro,
        mounted(tmp_path / "disk", "size=16m", fstype="tmpfs") as disk,
        mounted(tmp_path / "disk2", "size=16m", fstype="tmpfs") as disk2,
    ):
        background = "trainer.checkpoint.async_save=true"
        cases = [
            {"name": "read_only", "args": [*command, f"output_dir={ro}/run"]},
            {"name": "disk_full", "args": [*command, f"output_dir={disk}/run"]},
            {"name": "disk_full_async", "args": [*command, background, f"output_dir={disk2}/run"]},
            {
                "name": "resumed_with_room",
                "before": [["run", "mount", "-o", "remount,size=48m", str(disk)]],
                "args": [*command, "trainer.resume=auto", f"output_dir={disk}/run"],
            },
        ]
        before_resume = tmp_path / "metrics_before_resume.jsonl"
        cases[3]["before"][:0] = [  # what the failed run left, before the resume changes it
            ["run", "cp", str(disk / "run/metrics.jsonl"), str(before_resume)],
            ["run", "sh", "-c", f"ls -a {disk}/run/checkpoints > {tmp_path}/after_failure.txt"],
        ]
        r = run_cases(cases, tmp_path)
        refused(r["read_only"], 2, f"output_dir={ro}/run", "read-only file system")
        assert list(ro.iterdir()) == []

        line = refused(
            r["disk_full"], 1, str(disk / "run/checkpoints/.step_00000004.tmp"), "No space left"
        )
        assert "MiB free" in line and "step_00000002" in line and "trainer.resume=auto" in line
        after_failure = (tmp_path / "after_failure.txt").read_text().split()
        assert sorted(after_failure) == [".", "..", "step_00000002"]  # the partial one removed
        # the same in the background: named when the run next waits for the write
        line = refused(r["disk_full_async"], 1, str(disk2 / "run/checkpoints/.step_00000004.tmp"))
        assert "No space left" in line and "step_00000002" in line
        assert sorted(p.name for p in (disk2 / "run/checkpoints").iterdir()) == ["step_00000002"]
        first = read_jsonl(before_resume)
        assert [x["step"] for x in first] == [1, 2, 3, 4]

        assert r["resumed_with_room"]["code"] == 0, r["resumed_with_room"]["stderr"][-3000:]
        resumed = read_jsonl(disk / "run/metrics.jsonl")
        assert [x["step"] for x in resumed] == [1, 2, 3, 4]
        assert [x["loss"] for x in resumed] == pytest.approx([x["loss"] for x in first], abs=1e-6)
        assert sorted(p.name for p in (disk / "run/checkpoints").iterdir()) == [
            "step_00000002",
            "step_00000004",
        ]
