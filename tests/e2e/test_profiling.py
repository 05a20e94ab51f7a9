"""profile.* writes a real trace; debug.dump_hlo writes the step's graph and XLA's compiled
modules; every XLA run leaves the runtime's metrics report."""

from __future__ import annotations

import gzip
import json

from conftest import requires_xla, run_train

STEPS = (
    "trainer.max_steps=5",
    "trainer.progress_bar=false",
    "profile.start_step=3",
    "profile.num_steps=2",
)


@requires_xla
def test_xla_run_writes_a_trace_the_step_graphs_and_the_metrics_report(tmp_path):
    proc = run_train(*STEPS, "debug.dump_hlo=true", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 10_000
    events = json.loads(
        gzip.decompress(next(traces[0].parent.glob("*.trace.json.gz")).read_bytes())
    )
    assert events["traceEvents"]
    # the two graphs that compile, as traced: with their sharding annotations
    graphs = sorted(p.name for p in (tmp_path / "hlo").glob("step_*.hlo.txt"))
    assert graphs == ["step_00000001.hlo.txt", "step_00000002.hlo.txt"]
    assert "sharding={devices=[4" in (tmp_path / "hlo" / graphs[1]).read_text()
    # XLA's own dump: before and after SPMD partitioning, HLO text only
    dumped = list((tmp_path / "hlo" / "xla").iterdir())
    assert any(p.name.endswith("after_optimizations.txt") for p in dumped)
    assert any(p.name.endswith("before_optimizations.txt") for p in dumped)
    assert all(p.suffix == ".txt" for p in dumped)
    step = max(
        (p for p in dumped if p.name.endswith("cpu_after_optimizations.txt")),
        key=lambda p: p.stat().st_size,
    )
    # the per-device program: the [264, 128] embedding appears as its fsdp=4 shard
    assert "f32[66,128]" in step.read_text()
    assert "f32[66,128]" not in step.with_name(step.name.replace("cpu_after", "before")).read_text()
    report = (tmp_path / "xla_metrics_00000.txt").read_text()
    assert "Metric: CompileTime" in report and "Counter: " in report


def test_eager_run_writes_a_chrome_trace(tmp_path):
    proc = run_train("backend=cpu", "ici_mesh.fsdp=1", *STEPS, f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("aten::mm" in n or "aten::addmm" in n for n in names)
    assert not list(tmp_path.glob("xla_metrics_*.txt"))  # no XLA runtime, no report
