"""Host memory of a training step with and without activation checkpointing (remat), eager CPU.

    python -m bench.remat_memory [--depth 8]

The shapes of bench.hf_compare (vocab 32000, hidden 512, batch 4 x 256, float32). Each variant
runs in its own process (a clean peak), trains one warm-up step through the trainer, then
measures with the kernel's peak RSS counter (VmHWM, reset through /proc/self/clear_refs):
  - baseline: resident memory between steps (weights, AdamW moments, the runtime);
  - forward: peak above the baseline during the forward pass and loss, i.e. the activations
    kept for backward (the remat target) and the transient of the last operation;
  - step: peak above the baseline over a whole step (gradients and backward's temporaries too).
remat = model.remat.activation_checkpoint_layers=[LlamaDecoderLayer]: a layer keeps only its
input and recomputes the rest during backward.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from bench.child import RSS_ENV, run_child

TARGET = 2.0
VARIANTS = ("plain", "remat")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def measure(variant: str, depth: int) -> dict[str, float]:
    """In this process: MiB of the baseline and of the forward and step peaks above it."""
    import torch

    from bench.shapes import BATCH, SEQ, SHAPES
    from models import build_model
    from models.llama import LlamaConfig
    from torchprime.backend import select_backend
    from torchprime.materialize import materialize
    from torchprime.mesh import MeshAxesConfig, resolve_mesh
    from torchprime.rewriting import RematConfig, apply_rewriting
    from trainers import make_trainer
    from trainers.config import TrainerConfig

    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=1), MeshAxesConfig(), None)
    cfg = LlamaConfig(**{**SHAPES, "num_hidden_layers": depth})
    model = build_model(cfg, torch.float32)
    materialize(
        model,
        {n: (None,) * p.dim() for n, p in model.named_parameters()},
        mesh,
        backend,
        model.init_module_weights,
        torch.Generator().manual_seed(0),
    )
    layers = ["LlamaDecoderLayer"] if variant == "remat" else []
    apply_rewriting(model, RematConfig(activation_checkpoint_layers=layers), backend)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(
            TrainerConfig(progress_bar=False),
            model,
            backend,
            mesh,
            (),
            Path(tmp),
            tokens_per_step=BATCH * SEQ,
        )
        ids = torch.randint(
            0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)
        )
        batch = {"input_ids": ids, "labels": ids}
        trainer.train_step([batch])  # warm-up: allocator pools, lazily created state
        baseline = _status_kib("VmRSS")
        _reset_peak()
        loss, _ = trainer.forward(batch)
        forward = _status_kib("VmHWM") - baseline
        del loss
        baseline = _status_kib("VmRSS")
        _reset_peak()
        trainer.train_step([batch])
        step = _status_kib("VmHWM") - baseline
    return {"baseline_mib": baseline / 1024, "forward_mib": forward / 1024, "step_mib": step / 1024}


def run(depth: int) -> dict[str, Any]:
    """Each variant in a fresh process, its resident size following the live tensors."""
    result: dict[str, Any] = {"depth": depth, "variants": {}}
    for variant in VARIANTS:
        result["variants"][variant] = run_child(
            "remat_memory", variant, "--depth", str(depth), env=RSS_ENV
        )
    v = result["variants"]
    result["forward_ratio"] = v["plain"]["forward_mib"] / v["remat"]["forward_mib"]
    result["step_ratio"] = v["plain"]["step_mib"] / v["remat"]["step_mib"]
    return result


def print_result(r: dict[str, Any]) -> None:
    from bench.shapes import BATCH, SEQ, SHAPES

    print(
        f"remat memory: Llama vocab {SHAPES['vocab_size']}, hidden {SHAPES['hidden_size']}, "
        f"{r['depth']} layers, batch {BATCH} x {SEQ}, float32, eager CPU, peak RSS (MiB)"
    )
    print(f"{'variant':<8}{'baseline':>10}{'forward':>10}{'step':>10}")
    for name, v in r["variants"].items():
        print(
            f"{name:<8}{v['baseline_mib']:>10,.0f}{v['forward_mib']:>10,.0f}{v['step_mib']:>10,.0f}"
        )
    verdict = "OK" if r["forward_ratio"] >= TARGET else f"below the {TARGET:g}x target"
    print(
        f"ratio: activation memory (forward peak above baseline) without / with remat = "
        f"{r['forward_ratio']:.2f}x (target >= {TARGET:g}x): {verdict}; whole step "
        f"{r['step_ratio']:.2f}x"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.remat_memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.depth)))
        return {}
    result = run(args.depth)
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
