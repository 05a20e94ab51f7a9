"""Host memory of a training step with the loss over the whole sequence and in chunks
(model.loss_chunk_size), at Llama 3's vocabulary of 128,256, eager CPU.

    python -m bench.loss_memory [--chunk 32]

A small body (hidden 128, 2 layers) under a large head, so the logits are what the step's
memory is about, as on a pod: batch 4 x 256, float32. Each variant runs in its own process and
is measured as bench.remat_memory does (peak RSS above the resident baseline between steps,
VmHWM reset through /proc/self/clear_refs): forward = the forward pass and loss, step = a whole
training step. Target: the step's peak above the baseline falls at least 3x with chunks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from bench.child import RSS_ENV, run_child
from bench.remat_memory import _reset_peak, _status_kib

TARGET = 3.0
VOCAB, HIDDEN, LAYERS, BATCH, SEQ = 128256, 128, 2, 4, 256
VARIANTS = ("whole", "chunked")


def measure(chunk: int | None) -> dict[str, float]:
    """In this process: MiB of the baseline and of the forward and step peaks above it."""
    import torch

    from models import build_model
    from models.llama import LlamaConfig
    from torchprime.backend import select_backend
    from torchprime.materialize import materialize
    from torchprime.mesh import MeshAxesConfig, resolve_mesh
    from trainers import make_trainer
    from trainers.config import TrainerConfig

    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=1), MeshAxesConfig(), None)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=3 * HIDDEN,
        num_hidden_layers=LAYERS,
        loss_chunk_size=chunk,
    )
    model = build_model(cfg, torch.float32)
    specs = {n: (None,) * p.dim() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    materialize(model, specs, mesh, backend, model.init_module_weights, generator)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(
            TrainerConfig(progress_bar=False), model, backend, mesh, (), Path(tmp),
            tokens_per_step=BATCH * SEQ,
        )  # fmt: skip
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "labels": ids}
        loss = trainer.train_step([batch])["loss"].item()  # warm-up: pools, lazy state
        baseline = _status_kib("VmRSS")
        _reset_peak()
        out, _ = trainer.forward(batch)
        forward = _status_kib("VmHWM") - baseline
        del out
        baseline = _status_kib("VmRSS")
        _reset_peak()
        trainer.train_step([batch])
        step = _status_kib("VmHWM") - baseline
    return {
        "baseline_mib": baseline / 1024,
        "forward_mib": forward / 1024,
        "step_mib": step / 1024,
        "first_loss": loss,
    }


def run(chunk: int) -> dict[str, Any]:
    """Each variant in a fresh process, its resident size following the live tensors."""
    result: dict[str, Any] = {"chunk": chunk, "variants": {}}
    for variant in VARIANTS:
        result["variants"][variant] = run_child(
            "loss_memory", variant, "--chunk", str(chunk), env=RSS_ENV
        )
    v = result["variants"]
    result["step_ratio"] = v["whole"]["step_mib"] / v["chunked"]["step_mib"]
    result["forward_ratio"] = v["whole"]["forward_mib"] / v["chunked"]["forward_mib"]
    return result


def print_result(r: dict[str, Any]) -> None:
    print(
        f"loss memory: vocab {VOCAB:,}, hidden {HIDDEN}, {LAYERS} layers, batch {BATCH} x {SEQ}, "
        f"float32, eager CPU, peak RSS (MiB); chunked = model.loss_chunk_size={r['chunk']}"
    )
    print(f"{'variant':<9}{'baseline':>10}{'forward':>10}{'step':>10}{'first loss':>12}")
    for name, v in r["variants"].items():
        print(
            f"{name:<9}{v['baseline_mib']:>10,.0f}{v['forward_mib']:>10,.0f}"
            f"{v['step_mib']:>10,.0f}{v['first_loss']:>12.5f}"
        )
    verdict = "OK" if r["step_ratio"] >= TARGET else f"below the {TARGET:g}x target"
    print(
        f"ratio: step peak above baseline, whole / chunked = {r['step_ratio']:.2f}x (target >= "
        f"{TARGET:g}x): {verdict}; forward {r['forward_ratio']:.2f}x"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loss_memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.chunk if args.child == "chunked" else None)))
        return {}
    result = run(args.chunk)
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
