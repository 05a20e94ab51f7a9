"""Expert parallelism: the tiny Mixtral's experts split over `expert` give the numbers of one
device, the expert weights stay split, and the tokens (never the experts' weights) travel.

Each mesh trains 3 plain SGD steps of the tiny Mixtral (2 layers, 4 experts, routing per row,
capacity factor 1.25) with the moe_fsdp_ep preset and compares every loss and gradient with
the same model on one device (eager, on the CPU). expert=4 and expert=2 x fsdp=2 run here on
conftest's 4 devices (and expert=4 with the routing over the whole batch); expert=2 alone
(2 devices) and expert=4 x fsdp=2 (8 devices) run in processes of their own
(tests/unit/expert_parallel_run.py), the second also reading XLA's partitioned step.
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
    args = [
        sys.executable,
        "tests/unit/expert_parallel_run.py",
        str(devices),
        json.dumps(meshes),
        "capacity_per_row",
    ]
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
    shardings = {  # [experts, 2 x width, hidden] and [experts, hidden, width]
        ("capacity_per_row", 4, 1): ("{devices=[4,1,1]0,1,2,3}", "{devices=[4,1,1]0,1,2,3}"),
        ("capacity_per_row", 2, 2): ("{devices=[2,2,1]0,2,1,3}", "{devices=[2,1,2]0,2,1,3}"),
        ("capacity", 4, 1): ("{devices=[4,1,1]0,1,2,3}", "{devices=[4,1,1]0,1,2,3}"),
    }
    expected = {}
    for (routing, expert, fsdp), (gate_up, down) in shardings.items():
        cfg = moe_config(routing)
        if routing not in expected:
            expected[routing] = one_device(cfg)
        result = run_case(cfg, {"expert": expert, "fsdp": fsdp}, backend, expected[routing])
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
    # Routed per row, each device's expert buffers [experts, rows, capacity, hidden] go to the
    # experts' devices and come back by all-to-alls over `expert`: dispatch and combine, in the
    # forward and for their gradients (each tuple element of an all-to-all counted), 2 layers.
    swaps = [r for r in rows if r["kind"] == "all-to-all" and r["axes"] == ["expert"]]
    assert [(r["what"], r["count"]) for r in swaps] == [("activation f32[1, 1, 1, 20, 128]", 32)]
    # and no activation of the expert blocks is gathered over `expert` (what is left over
    # fsdp+expert is the embedding's and the loss's, as in every data-parallel step)
    assert not [r for r in rows if r["axes"] == ["expert"] and r["kind"] == "all-gather"]
    assert audit["flags"] == []


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
    elements = moe_per_token_elements(cfg.model, tensor=1, seq_len=4096)
    assert elements["dispatched"] == 2 * 1.25 * 4096
    assert elements["routing_masks"] == 2 * 2 * 1.25 * 4096  # [rows, T, E, C] dispatch, combine
    wider = dataclasses.replace(cfg.model, capacity_factor=2.5)
    wide = moe_per_token_elements(wider, tensor=1, seq_len=4096)
    assert wide["dispatched"] == 2 * elements["dispatched"]
    # model FLOPs count the 2 of 8 experts a token uses: 12.88B active parameters with the
    # embedding (published: 12.9B), against 46.7B in all
    active = model_flops_per_token(build_model(cfg.model, cfg.resolved_precision.params), 0) / 6
    assert round((active + 32000 * 4096) / 1e9, 2) == 12.88
    assert "step model (roofline, per device per step, TPU v5p x 64)" in report
    assert "all-to-all     expert            192   52.50 GiB" in report
    assert "compute-bound" in report


def test_routing_per_row_equals_dropless_with_room_and_counts_what_it_drops():
    import torch

    from models import build_model
    from models.mixtral import MixtralConfig

    def model(**routing):
        cfg = MixtralConfig(num_hidden_layers=2, intermediate_size=64, **routing)
        m = build_model(cfg, torch.float32)
        m.to_empty(device="cpu")
        m.init_weights(torch.Generator().manual_seed(0))
        return m

    ids = torch.randint(0, 259, (4, 24), generator=torch.Generator().manual_seed(1))
    reference = model(moe_implementation="dropless")(ids).logits
    # 2 x (T k / E) = T slots a row and expert: no expert can overflow within a row
    roomy = model(moe_implementation="capacity_per_row", capacity_factor=2.0)
    assert (roomy(ids).logits - reference).abs().max() < 1e-5
    assert roomy(ids, labels=ids).metrics["dropped_fraction"] == 0
    tight = model(moe_implementation="capacity_per_row", capacity_factor=0.5)(ids, labels=ids)
    # 6 slots a row and expert, 24 in all for a row's 48 assignments: at least half dropped
    assert tight.metrics["dropped_fraction"] >= 0.5
