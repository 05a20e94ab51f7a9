"""The recompile guard: a compilation after warm-up is reported with its cause, or stops."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import requires_xla
from torchprime.recompile import RecompileError, RecompileGuard


def step(backend, guard, n, x, op):
    y = op(x)
    guard.before_sync(n, [y])
    backend.sync()
    guard.after_step(n)
    return y


@requires_xla
def test_a_changed_step_graph_is_named_and_both_graphs_saved(tmp_path, caplog):
    from torchprime.backend import select_backend

    backend = select_backend("xla", cpu_devices=4)
    guard = RecompileGuard(backend, warmup_steps=1, dump_dir=tmp_path)
    x = torch.ones(8, device=backend.device)
    backend.sync()  # x is data from here on, as parameters are
    with caplog.at_level(logging.WARNING):
        for n in (1, 2, 3):
            step(backend, guard, n, x, lambda t: t * 2.0)
        assert guard.late_compiles == 0
        step(backend, guard, 4, x, lambda t: t.exp())  # the step's graph changed
    assert guard.late_compiles == 1
    assert "1 XLA compilation(s) at step 4, after warm-up: the training step's graph changed" in (
        caplog.text
    )
    dump = tmp_path / "recompile_step_00000004"
    assert (dump / "steady_step.hlo.txt").read_text() != (dump / "this_step.hlo.txt").read_text()


@requires_xla
def test_a_compilation_outside_the_step_is_told_apart_and_can_stop_the_run():
    from torchprime.backend import select_backend

    backend = select_backend("xla", cpu_devices=4)
    guard = RecompileGuard(backend, warmup_steps=1, fail=True)
    x = torch.ones(16, device=backend.device)
    backend.sync()
    for n in (1, 2):
        step(backend, guard, n, x, lambda t: t * 5.0)
    y = x * 5.0
    guard.before_sync(3, [y])
    backend.sync()
    (x + 123.0).sum().item()  # another graph, outside the step (say, an evaluation)
    with pytest.raises(
        RecompileError,
        match=r"at step 3, after warm-up: a graph outside the "
        r"training step \(the checkpoint save\)",
    ):
        guard.after_step(3, "the checkpoint save")
