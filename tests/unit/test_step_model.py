# ruff: noqa: E501  (a module in XLA's HLO text: one instruction a line, as XLA writes it)
"""The step model: the roofline of real presets on their pods, and the collective audit of a
partitioned module (its parsing and its flags)."""

from __future__ import annotations

import pytest
import torch

from conftest import composed
from run.preflight import Devices, preflight
from torchprime.chips import CHIPS, ChipName
from torchprime.collectives import (
    HloParseError,
    audit,
    format_audit,
    parse_collectives,
)
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.plan import ParameterPlan, ShardingPlan
from torchprime.step_model import format_step_model

#: MaxText's published Llama 3.1 8B on v6e-256 (docs/reference/models/tiering.md): 45.46% MFU.
MEASURED_8B_V6E_MFU = 0.4546


def step_model_of(*overrides):
    cfg = composed(*overrides)
    pre = preflight(cfg, Devices.of_target(cfg.target), open_data=False)
    assert pre.ok, pre.error()
    return pre.plan, pre.step_model


def traffic(model, kind, axes):
    return next(t for t in model.traffic if t.kind == kind and t.axes == axes)


def test_fsdp_8b_on_v5p_128_gathers_each_weight_twice_and_is_compute_bound():
    plan, m = step_model_of("+config=llama3_8b_v5p_128")
    n = plan.mesh.shape["fsdp"]
    whole = plan.parameter_bytes * n  # every weight once gathered (all are split over fsdp)
    gather, scatter = traffic(m, "all-gather", ("fsdp",)), traffic(m, "reduce-scatter", ("fsdp",))
    assert gather.ici_bytes == pytest.approx(2 * whole * (n - 1) / n)
    assert scatter.ici_bytes == pytest.approx(whole * (n - 1) / n)
    assert gather.count == 2 * len(plan.parameters) and gather.dcn_bytes == 0
    # the preset recomputes the layers in the backward: 8 N FLOPs a token instead of 6 N
    assert m.flops == pytest.approx(m.model_flops * 4 / 3)
    assert m.seconds["compute"] == pytest.approx(m.flops / CHIPS[ChipName.v5p].peak_flops)
    assert m.bound == "compute" and m.mfu_bound == pytest.approx(0.75)
    text = format_step_model(m)
    assert "all-gather     fsdp" in text and "compute-bound" in text


def test_8b_on_v6e_256_bound_lies_between_the_measured_mfu_and_the_peak():
    _, m = step_model_of("+config=llama3_8b_v6e_256")
    assert MEASURED_8B_V6E_MFU < m.mfu_bound < 1.0


def test_tensor_parallelism_all_reduces_each_layers_outputs_in_and_out():
    plan, m = step_model_of("+config=llama3_1_70b_v6e_256")
    tp = traffic(m, "all-reduce", ("tensor",))
    layers = 80
    assert tp.count == 6 * layers  # 2 forward, 2 backward, 2 in the recomputed forward


def test_context_parallelism_with_splash_swaps_sequence_for_heads_in_each_layer():
    cfg = composed("+config=llama3_8b_32k_v5p_128")
    _, m = step_model_of("+config=llama3_8b_32k_v5p_128")
    swaps = traffic(m, "all-to-all", ("context",))
    passes = 3  # forward, recomputed forward, backward
    layers, micro = cfg.model.num_hidden_layers, cfg.trainer.grad_accum_steps
    assert swaps.count == 4 * passes * layers * micro  # q, k, v in and the output out
    c, fsdp, mod = cfg.ici_mesh.context, cfg.ici_mesh.fsdp, cfg.model
    tokens = cfg.trainer.global_batch_size * cfg.data.block_size / micro / fsdp / c  # a device's
    width = 2 * mod.num_attention_heads * mod.resolved_head_dim + 2 * mod.num_key_value_heads * (
        mod.resolved_head_dim
    )
    # each all-to-all sends (c-1)/c of a device's tokens, all heads, in bfloat16
    assert swaps.ici_bytes == pytest.approx(swaps.count / 4 * tokens * width * 2 * (c - 1) / c)
    assert not any(t.axes == ("context",) and t.kind == "all-gather" for t in m.traffic)


def test_axes_over_slices_cross_dcn_and_a_chip_without_its_figure_is_said():
    _, m = step_model_of("+config=llama3_8b_v6e_256", "ici_mesh.fsdp=128", "dcn_mesh.data=2")
    reduce = traffic(m, "all-reduce", ("data",))  # weights replicated over data: gradients
    assert reduce.dcn_bytes > 0 and reduce.ici_bytes == 0
    assert m.seconds["dcn"] is None
    assert any("no DCN bandwidth for TPU v6e" in x for x in m.missing)
    assert "not computed: DCN time" in format_step_model(m)
    _, p = step_model_of("+config=llama3_8b_v5p_128", "ici_mesh.fsdp=32", "dcn_mesh.data=2")
    assert p.seconds["dcn"] > 0 and not p.missing


# A partitioned module in XLA's text syntax, on a mesh of fsdp=2 x tensor=2 (device = 2 f + t):
# groups {{0,2},{1,3}} span fsdp, {{0,1},{2,3}} span tensor.
HLO = """\
HloModule step

%cut.1 (p0: f32[8,4], p1: s32[]) -> f32[4,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %dynamic-slice.1 = f32[4,4]{1,0} dynamic-slice(%p0, %p1, %p1), dynamic_slice_sizes={4,4}
}

%body.1 (arg: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %param.9 = f32[4,4]{1,0} parameter(0)
  %all-gather.9 = f32[8,4]{1,0} all-gather(%param.9), channel_id=9, replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}, use_global_device_ids=true
}

ENTRY %main (param.1: f32[4,4], param.2: f32[3,4]) -> f32[] {
  %param.1 = f32[4,4]{1,0} parameter(0)
  %param.2 = f32[3,4]{1,0} parameter(1)
  %partition-id = u32[] partition-id()
  %all-gather.1 = f32[8,4]{1,0} all-gather(%param.1), channel_id=1, replica_groups={{0,2},{1,3}}, dimensions={0}, use_global_device_ids=true
  %all-reduce.2 = f32[8,4]{1,0} all-reduce(%dot.1), channel_id=2, replica_groups={{0,2},{1,3}}, use_global_device_ids=true, to_apply=%add
  %fusion.1 = f32[4,4]{1,0} fusion(%all-reduce.2, %partition-id), kind=kLoop, calls=%cut.1
  %all-gather.2 = f32[6,4]{1,0} all-gather(%param.2), channel_id=5, replica_groups=[2,2]<=[4], dimensions={0}, use_global_device_ids=true
  %all-gather.3 = f32[2,16,4]{2,1,0} all-gather(%act.1), channel_id=3, replica_groups=[2,2]<=[4], dimensions={1}, use_global_device_ids=true
  %while.1 = (s32[], f32[4,4]{1,0}) while(%tuple.1), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %all-reduce.4 = f32[] all-reduce(%loss.1), channel_id=4, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
}
"""


def small_plan() -> ShardingPlan:
    mesh = resolve_mesh(MeshAxesConfig(fsdp=2, tensor=2), MeshAxesConfig(), None)
    up = ParameterPlan(
        "model.layers.0.mlp.up_proj.weight", (8, 4), ("fsdp", None), (4, 4), torch.float32
    )
    q = ParameterPlan(
        "model.layers.0.self_attn.q_proj.weight", (6, 4), ("tensor", None), (3, 4), torch.float32
    )
    return ShardingPlan(mesh, [up, q], 0, 0, 0)


def test_collectives_are_read_on_mesh_axes_with_cpu_reduce_scatters_and_loop_trips():
    plan = small_plan()
    found = {c.instruction: c for c in parse_collectives(HLO, plan.mesh, "step.txt")}
    assert found["all-gather.1"].axes == ("fsdp",) and found["all-gather.1"].dimension == 0
    assert found["all-reduce.2"].kind == "reduce-scatter"  # cut per device by partition id
    assert found["all-gather.3"].axes == ("tensor",)  # iota groups [2,2]<=[4]
    assert found["all-gather.9"].axes == ("fsdp",) and found["all-gather.9"].runs == 3
    assert found["all-reduce.4"].kind == "all-reduce" and found["all-reduce.4"].shape == ()


def test_the_audit_names_the_weight_and_flags_what_does_not_fit_the_layout():
    plan = small_plan()
    log = (
        "W0000 00:00:1.0 1 spmd_partitioner.cc:643] [SPMD] Involuntary full rematerialization. "
        "The compiler cannot go from sharding {devices=[1,4,1,1]0,1,2,3} to {replicated} "
        "efficiently for HLO operation %broadcast.248 = f32[8,1,256,32]{3,2,1,0} broadcast("
    )
    a = audit(parse_collectives(HLO, plan.mesh), plan, layers=1, module="step.txt", log_text=log)
    rows = {(r.kind, r.axes, r.what): r for r in a.rows}
    up = "model.layers.*.mlp.up_proj.weight"
    assert rows[("all-gather", ("fsdp",), up)].count == 1 + 3  # once, and 3 times in the loop
    assert rows[("reduce-scatter", ("fsdp",), up)].count == 1
    flags = "\n".join(a.flags)
    assert (
        "model.layers.*.self_attn.q_proj.weight ['tensor', None] is all-gathered over tensor"
        in flags
    )
    assert "activation f32[2, 16, 4] is all-gathered on its sequence dimension over tensor" in flags
    assert "involuntary full rematerialization: a broadcast f32[8,1,256,32]" in flags
    assert len(a.flags) == 3 and "FLAGS 3" in format_audit(a)


def test_a_collective_the_parser_cannot_read_names_the_file_and_line():
    bad = HLO.replace("replica_groups=[2,2]<=[4], dimensions={1}", "replica_groups=[2,3]<=[4]")
    with pytest.raises(HloParseError, match=r"step\.txt:22: cannot read this collective"):
        parse_collectives(bad, small_plan().mesh, "step.txt")


def test_the_stderr_tee_keeps_xla_log_lines_in_its_file_only(tmp_path, capfd):
    import os

    from run.stderr_tee import stderr_tee

    path = tmp_path / "xla_log.txt"
    xla = b"W0000 00:00:1796223252.4 24395 spmd_partitioner.cc:643] [SPMD] Involuntary full\n"
    with stderr_tee(path):
        os.write(2, xla)  # as XLA's C++ logging writes: below Python, on descriptor 2
        os.write(2, b"a Python warning\n")
    err = capfd.readouterr().err
    assert "a Python warning" in err and "Involuntary" not in err
    assert path.read_bytes() == xla + b"a Python warning\n"
