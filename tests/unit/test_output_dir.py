"""output_dir is checked before anything writes there; a failed start leaves it reusable."""

from __future__ import annotations

import pytest

from conftest import mounted
from run.output_dir import check_output_dir, output_dir_problem
from run.preflight import check_no_previous_run
from torchprime.errors import ConfigError


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir=.*/f: it is a file, not a folder"):
        check_output_dir(tmp_path / "f")


def test_a_folder_under_a_file_names_the_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert output_dir_problem(tmp_path / "f" / "a" / "b") == (
        f"{tmp_path / 'f'} is a file, not a folder, so nothing can be made under it"
    )


def test_a_new_folder_under_a_writable_one_is_fine_and_nothing_is_left(tmp_path):
    assert output_dir_problem(tmp_path / "new" / "run") is None
    assert list(tmp_path.iterdir()) == []  # the probe file is gone, no folder made


def test_a_read_only_file_system_is_named(tmp_path):
    # Root ignores permission bits (a chmod 0o555 folder stays writable for it): a read-only
    # bind mount is refused to root too.
    with mounted(tmp_path / "ro", "bind,ro"):
        assert output_dir_problem(tmp_path / "ro" / "run") == (
            f"{tmp_path / 'ro'} (where it would be made) is on a read-only file system"
        )


def test_an_empty_metrics_file_left_by_a_failed_start_does_not_block_the_rerun(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    check_no_previous_run(tmp_path)  # no error
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="trainer.resume=auto"):
        check_no_previous_run(tmp_path)


def test_the_metrics_file_is_made_by_the_first_record_not_before(tmp_path):
    from trainers.metrics import MetricsFile, read_metrics

    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    metrics.close()  # a run that stopped before its first logged step
    assert not (tmp_path / "metrics.jsonl").exists()
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    metrics.write({"step": 1, "loss": 2.5})
    metrics.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.5}]


def test_a_full_disk_during_a_metrics_write_names_the_file_and_the_free_space(tmp_path):
    from trainers.metrics import MetricsFile, read_metrics, truncate_metrics
    from trainers.storage import WriteFailed

    with mounted(tmp_path / "disk", "size=64k", fstype="tmpfs") as disk:
        metrics = MetricsFile(disk / "metrics.jsonl")
        metrics.write({"step": 1, "loss": 2.5})
        (disk / "filler").write_bytes(b"x" * (64 * 1024 - 4096))  # the disk is now full
        with pytest.raises(WriteFailed) as failed:
            metrics.write({"step": 2, "loss": 2.0, "pad": "y" * 8192})
        metrics.close()  # the buffered rest fails again, quietly
        message = str(failed.value)
        assert f"metrics of step 2: writing {disk / 'metrics.jsonl'} failed" in message
        assert "No space left on device" in message and "MiB free there" in message
        (disk / "filler").unlink()  # room again: a resume drops the cut line, keeps step 1
        assert truncate_metrics(disk / "metrics.jsonl", 1) == 1
        assert read_metrics(disk / "metrics.jsonl") == [{"step": 1, "loss": 2.5}]
