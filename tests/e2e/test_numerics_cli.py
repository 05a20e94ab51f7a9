"""`python -m tools.numerics` as a user runs it: each side in a process of its own, the tables
on stdout, the JSON file, and the exit status (0 within the tolerance, 1 past it, 2 bad input)."""

from __future__ import annotations

import json

from conftest import requires_xla, run_train

NUMERICS = "-m tools.numerics"


@requires_xla
def test_cpu_against_xla_fsdp4_with_a_perturbed_layer_over_two_lengths(tmp_path):
    # Side b (XLA, 4 devices) gets one weight perturbed: everything before that layer agrees
    # with the CPU below 1e-5, and the table points at the layer.
    out = tmp_path / "numerics.json"
    proc = run_train(
        "--a",
        "backend=cpu ici_mesh.fsdp=1",
        "--b",
        "backend=xla ici_mesh.fsdp=4",
        "--seq-lens",
        "32",
        "96",
        "--perturb",
        "model.layers.3.mlp.down_proj.weight=1e-3",
        "--json",
        str(out),
        script=NUMERICS,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "<- first past 1e-05" in proc.stdout
    assert "relative errors by sequence length" in proc.stdout
    report = json.loads(out.read_text())
    assert "xla (4 x CPU), mesh fsdp=4" in report["b"]
    assert [run["seq_len"] for run in report["runs"]] == [32, 96]
    for run in report["runs"]:
        assert run["batch_size"] == 4
        assert run["first_past_tolerance"] == "layers.3.mlp"
        names = [t["name"] for t in run["tensors"]]
        for t in run["tensors"][: names.index("layers.3.mlp")]:
            assert t["rel_err"] < 1e-5 and t["max_abs_err"] < 1e-5, t


def test_bad_input_exits_2_naming_the_value():
    proc = run_train("--b", "backend=xla ici_mesh.fsdp=4", "--batch-size", "3", script=NUMERICS)
    assert proc.returncode == 2
    assert "error: --batch-size=3 does not split over the 4 data-parallel devices" in proc.stderr
