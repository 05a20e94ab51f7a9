"""Expert parallelism: the tiny Mixtral's experts split over `expert` give the numbers of one
device, the expert weights stay split, and the tokens (never the experts' weights) travel.

Each mesh trains 3 plain SGD steps of the tiny Mixtral (2 layers, 4 experts, capacity
routing) with the moe_fsdp_ep preset and compares every loss and gradient with the same model
on one device (eager, on the CPU). expert=4 and expert=2 x fsdp=2 run here on conftest's 4
devices; expert=2 alone (2 devices) and expert=4 x fsdp=2 (8 devices) run in processes of
their own (tests/unit/expert_parallel_run.py), the second also reading XLA's partitioned step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from expert_parallel_run import moe_config, one_device, run_case

from conftest import ROOT, composed, requires_xla
from torchprime.errors import ConfigError
from torchprime.experts import expert_problems, rows_spec
from torchprime.mesh import MeshAxesConfig, resolve_mesh

TOLERANCE = 1e-5


def in_own_process(devices: int, meshes: list[dict], dump=None) -> list[dict]:
    """tests/unit/expert_parallel_run.py's results in a process with `devices` devices."""
    args = [sys.executable, "tests/unit/expert_parallel_run.py", str(devices), json.dumps(meshes)]
    proc = subprocess.run(
        [*args, *([str(dump)] if dump else [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def assert_equivalent(result: dict) -> None:
    assert result["blocks"] == 2  # both layers' blocks took the layout
    assert result["loss_error"] <= TOLERANCE and result["grad_error"] <= TOLERANCE, result
    assert result["losses"][-1] < result["losses"][0]  # it trains


@requires_xla
def test_experts_split_over_four_devices_give_the_numbers_of_one_device():
    from torchprime.backend import select_backend

    backend = select_backend("xla", cpu_devices=4)
    cfg = moe_config()
    expected = one_device(cfg)
    shardings = {  # [experts, 2 x width, hidden] and [experts, hidden, width]
        (4, 1): ("{devices=[4,1,1]0,1,2,3}", "{devices=[4,1,1]0,1,2,3}"),
        (2, 2): ("{devices=[2,2,1]0,2,1,3}", "{devices=[2,1,2]0,2,1,3}"),
    }
    for (expert, fsdp), (gate_up, down) in shardings.items():
        result = run_case(cfg, {"expert": expert, "fsdp": fsdp}, backend, expected)
        print(result)  # the closing note's figures (pytest -s)
        assert_equivalent(result)
        assert (result["gate_up_proj"], result["down_proj"]) == (gate_up, down)
        assert result["batch"] == "{devices=[4,1]0,1,2,3}"  # rows over (fsdp, expert)


@requires_xla
def test_two_and_eight_devices_and_the_partitioned_step_moves_tokens_not_experts(tmp_path):
    (two,) = in_own_process(2, [{"expert": 2}])
    print(two)
    assert_equivalent(two)
    assert two["gate_up_proj"] == "{devices=[2,1,1]0,1}"
    (eight,) = in_own_process(8, [{"expert": 4, "fsdp": 2}], dump=tmp_path / "hlo")
    audit = eight.pop("collectives")
    print(eight)
    assert_equivalent(eight)
    assert eight["gate_up_proj"] == "{devices=[4,2,1]0,4,1,5,2,6,3,7}"
    assert eight["down_proj"] == "{devices=[4,1,2]0,4,1,5,2,6,3,7}"
    rows = audit["rows"]
    # No collective moves an expert's weights or their gradients: each device computes with
    # the experts it stores.
    assert not [r for r in rows if "experts" in r["what"]], rows
    # The routing fills the experts' slots in token order over the whole batch (models/moe.py),
    # so the tokens travel by gathers over the batch axes (fsdp, expert): the k expert outputs
    # of every token [k, tokens, hidden] gathered, their gradient reduce-scattered.
    routed = {(r["kind"], r["what"]) for r in rows if r["axes"] == ["fsdp", "expert"]}
    assert ("all-gather", "activation f32[2, 256, 128]") in routed
    assert ("reduce-scatter", "activation f32[512, 128]") in routed
    assert not [f for f in audit["flags"] if "experts" in f or "rematerialization" in f]


def test_rows_spec_moves_the_expert_axis_to_the_rows():
    assert rows_spec(("expert", ("data", "fsdp"), None)) == (
        None, ("data", "fsdp", "expert"), None
    )  # fmt: skip
    assert rows_spec((None, ("data", "fsdp"), None)) == (None, ("data", "fsdp"), None)


def mesh(**axes):
    return resolve_mesh(MeshAxesConfig(**axes), MeshAxesConfig(), None)


def test_bad_expert_layouts_are_refused_naming_the_key():
    moe = composed("model=tiny_moe", "model/sharding=moe_fsdp_ep").model
    spec = ("expert", ("data", "fsdp"), None)
    (problem,) = expert_problems(mesh(expert=3), moe, spec)
    assert problem.startswith("model.num_local_experts=4 does not split over the 3 devices")
    (problem,) = expert_problems(mesh(expert=2), moe, None)
    assert "model.sharding.dispatch=null" in problem and "moe_fsdp_ep" in problem
    llama = composed().model
    (problem,) = expert_problems(mesh(expert=2), llama, spec)
    assert "model.name=llama has no experts" in problem
    assert not expert_problems(mesh(expert=4, fsdp=2), moe, spec)
    assert not expert_problems(mesh(fsdp=4), llama, None)


def test_an_expert_axis_on_a_dense_model_stops_the_run_at_start_up():
    from run.preflight import Devices, preflight

    cfg = composed("ici_mesh.fsdp=2", "ici_mesh.expert=2")
    pre = preflight(cfg, Devices(kind="CPU", count=4), open_data=False)
    with pytest.raises(ConfigError, match="model.name=llama has no experts"):
        pre.raise_if_problems()


def test_the_pod_plan_counts_experts_per_device_and_buffers_at_the_capacity_factor():
    import dataclasses

    from models import build_model
    from models.memory import moe_per_token_elements
    from run.preflight import Devices, plan_report, preflight
    from trainers.metrics import model_flops_per_token

    cfg = composed("+config=mixtral_8x7b_v5p_128")
    pre = preflight(cfg, Devices.of_target(cfg.target), open_data=False)
    assert pre.ok, list(pre.problems)
    report = plan_report(pre)
    # each chip: one of the 8 experts of each layer, an eighth of it (fsdp=8 inside)
    assert "[8, 28672, 4096]   [expert, fsdp, -]      [1, 3584, 4096]" in report
    assert "of which experts   1.31 GiB  (parts of 1 of the 8 experts of each layer)" in report
    # the expert buffers: top-k x capacity factor slots a token, of the hidden width
    elements = moe_per_token_elements(cfg.model, tensor=1)
    assert elements["dispatched"] == 2 * 1.25 * 4096
    wider = dataclasses.replace(cfg.model, capacity_factor=2.5)
    assert moe_per_token_elements(wider, tensor=1)["dispatched"] == 2 * elements["dispatched"]
    # model FLOPs count the 2 of 8 experts a token uses: 12.88B active parameters with the
    # embedding (published: 12.9B), against 46.7B in all
    active = model_flops_per_token(build_model(cfg.model, cfg.resolved_precision.params), 0) / 6
    assert round((active + 32000 * 4096) / 1e9, 2) == 12.88
    assert "step model (roofline, per device per step, TPU v5p x 64)" in report
    assert "MoE routing: the micro-batch's tokens and their k expert outputs" in report
