"""Bad input stops the run at start-up with one line that names the key or value."""

from __future__ import annotations

import pytest

from conftest import requires_xla, run_train


def cause_line(stderr: str, needle: str) -> str:
    lines = [line for line in stderr.splitlines() if needle in line]
    assert lines, f"no line of stderr names {needle!r}:\n{stderr[-2000:]}"
    return lines[0]


def test_a_typo_in_a_key_names_the_key(tmp_path):
    proc = run_train(
        "backend=cpu", "ici_mesh.fsdp=1", "trainer.max_stepz=3", f"output_dir={tmp_path}"
    )
    assert proc.returncode != 0
    cause_line(proc.stderr, "max_stepz")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_wrong_type_names_the_key_and_value(tmp_path):
    proc = run_train(
        "backend=cpu", "ici_mesh.fsdp=1", "trainer.max_steps=many", f"output_dir={tmp_path}"
    )
    assert proc.returncode != 0
    assert "many" in cause_line(proc.stderr, "max_steps")


def test_an_unknown_group_option_names_the_option(tmp_path):
    proc = run_train("backend=cpu", "ici_mesh.fsdp=1", "model=llama_9000", f"output_dir={tmp_path}")
    assert proc.returncode != 0
    cause_line(proc.stderr, "llama_9000")


def test_a_cross_key_problem_is_one_error_line(tmp_path):
    # Without evaluation: 4096-token rows would also be too few for the held-out batches.
    proc = run_train(
        "backend=cpu",
        "ici_mesh.fsdp=1",
        "data.block_size=4096",
        "eval.holdout=null",
        "eval.interval=null",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 2
    line = cause_line(proc.stderr, "data.block_size=4096")
    assert line.startswith("error: ") and "max_position_embeddings=2048" in line


def test_logical_shards_that_do_not_divide_the_batch_name_the_key_and_the_rule(tmp_path):
    proc = run_train(
        "backend=cpu", "ici_mesh.fsdp=1", "data.logical_shards=3", f"output_dir={tmp_path}"
    )
    assert proc.returncode == 2
    line = cause_line(proc.stderr, "data.logical_shards=3")
    assert "global batch of 8 rows" in line and "divisor of 8" in line
    assert "error: 1 problem" in proc.stderr  # the data sources are named as not checked
    assert not (tmp_path / "metrics.jsonl").exists()


@requires_xla
def test_a_mesh_that_does_not_match_the_devices_shows_both(tmp_path):
    proc = run_train("cpu_devices=4", "ici_mesh.fsdp=8", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    line = cause_line(proc.stderr, "error: ")
    assert "fsdp: 8" in line and "there are 4" in line


def test_a_batch_the_mesh_cannot_split_names_both(tmp_path):
    # XLA with 4 devices applies the mesh (backend=cpu without torchrun runs unsharded)
    proc = run_train("trainer.global_batch_size=6", "ici_mesh.fsdp=4", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    line = cause_line(proc.stderr, "global_batch_size=6")
    assert "trainer.global_batch_size=6" in line and "4 data-parallel devices" in line


def test_a_second_run_into_the_same_output_dir_is_refused_and_changes_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    proc = run_train("backend=cpu", "ici_mesh.fsdp=1", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert f"output_dir={tmp_path} already holds a run (metrics.jsonl)" in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert not (tmp_path / "config.yaml").exists()


def test_an_unknown_choice_is_refused_by_the_loader_with_the_choices(tmp_path):
    proc = run_train("target.chip=v7", f"output_dir={tmp_path}")
    assert proc.returncode != 0
    assert "Invalid value 'v7', expected one of [v4, v5e, v5p, v6e]" in proc.stderr
    assert "full_key: target.chip" in proc.stderr


def test_target_and_dry_run_keys_are_checked(tmp_path):
    proc = run_train("target.hbm_gib=0", "dry_run_devices=128", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "target.hbm_gib=0.0: must be positive." in proc.stderr
    assert "dry_run_devices=128: XLA on the CPU runs 1 to 64 virtual devices." in proc.stderr


# Four independent mistakes: a mesh that does not cover the devices, a batch that mesh cannot
# split, a sharding pattern and a remat class that match nothing. Each mode reports all four.
FOUR_MISTAKES = (
    "ici_mesh.fsdp=8",
    "trainer.global_batch_size=12",
    "++model.sharding.parameters={lm_haed.weight: [fsdp, null]}",
    "model.remat.activation_checkpoint_layers=[LlamaDecoderLayr]",
)
EXPECTED = (
    "= 8 devices, but there are 4",
    "trainer.global_batch_size=12 does not split",
    "['lm_haed.weight'] matches no parameter",
    "no module of class 'LlamaDecoderLayr'",
)


@requires_xla
@pytest.mark.parametrize("mode", ["run", "plan_only", "dry_run"])
def test_four_independent_mistakes_are_reported_together_in_every_mode(tmp_path, mode):
    extra = {
        "run": ("cpu_devices=4",),
        "plan_only": ("plan_only=true", "target.num_devices=4"),
        "dry_run": ("dry_run=true", "target.num_devices=4"),
    }[mode]
    proc = run_train(*FOUR_MISTAKES, *extra, f"output_dir={tmp_path}")
    assert proc.returncode == (1 if mode == "dry_run" else 2), proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for expected in EXPECTED:
        assert expected in text, (expected, text[-3000:])
    assert ("PROBLEMS    4" if mode == "dry_run" else "error: 4 problems:") in text
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()
