"""The policy through the real command: float32 master weights, bfloat16 compute and the loss in
chunks on XLA SPMD (4 devices) compile as often as the plain run (2 graphs) and checkpoint
float32 weights."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint import FileSystemReader

from conftest import read_jsonl, requires_xla, run_train


@requires_xla
def test_bf16_compute_with_a_chunked_loss_trains_on_xla_and_saves_float32_weights(tmp_path):
    proc = run_train(
        "precision.compute=bfloat16",
        "model.loss_chunk_size=64",
        "trainer.max_steps=4",
        "trainer.logging_steps=1",
        "trainer.progress_bar=false",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision: params float32, compute bfloat16 (autocast)" in proc.stderr + proc.stdout
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["compiles"] == 2  # the step, then with the optimizer state: no more
    meta = FileSystemReader(str(tmp_path / "checkpoints" / "step_00000004")).read_metadata()
    dtypes = {
        v.properties.dtype
        for k, v in meta.state_dict_metadata.items()
        if k.startswith("model.") and hasattr(v, "properties")
    }
    assert dtypes == {torch.float32}
