"""Compile time and steady step time on XLA (virtual CPU devices), unrolled vs scanned layers.

    python -m bench.compile_scan [--depths 4 8 16 32] [--steps 5] [--variants unrolled scan stacked]

For each depth, one training setup per variant (FSDP over 4 devices, the tiny model's width):
the first step's wall time (tracing + compilation + one run), the XLA compile time the runtime
reports, and the mean time of the steps after the graph is cached. Variants: `unrolled` (every
layer in the graph), `scan` (torch_xla's scan_layers: one layer compiled, the weights stacked
and the gradients split at every step) and `stacked` (model.remat.stack_weights: the weights
stored stacked, the scan's sequence input). The variants of a depth run one after the other
(interleaved), so a change in the machine's load touches all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402

from models import build_model  # noqa: E402
from models.llama import LlamaConfig  # noqa: E402
from torchprime.backend import select_backend  # noqa: E402
from torchprime.materialize import materialize  # noqa: E402
from torchprime.mesh import MeshAxesConfig, resolve_mesh  # noqa: E402
from torchprime.rewriting import RematConfig, apply_rewriting  # noqa: E402
from torchprime.sharding import ShardingConfig, plan_parameter_specs  # noqa: E402
from trainers.base_trainer import build_optimizer  # noqa: E402
from trainers.config import TrainerConfig  # noqa: E402

FSDP = {
    "model.embed_tokens.weight": ["fsdp", None],
    "model.layers.*.self_attn.q_proj.weight": ["fsdp", None],
    "model.layers.*.self_attn.k_proj.weight": ["fsdp", None],
    "model.layers.*.self_attn.v_proj.weight": ["fsdp", None],
    "model.layers.*.self_attn.o_proj.weight": [None, "fsdp"],
    "model.layers.*.mlp.gate_proj.weight": ["fsdp", None],
    "model.layers.*.mlp.up_proj.weight": ["fsdp", None],
    "model.layers.*.mlp.down_proj.weight": [None, "fsdp"],
    "lm_head.weight": ["fsdp", None],
}


VARIANTS = {
    "unrolled": RematConfig(),
    "scan": RematConfig(scan_layers="model.layers"),
    "stacked": RematConfig(scan_layers="model.layers", stack_weights=True),
}


def measure(backend, mesh, depth: int, variant: str, steps: int) -> dict[str, float]:
    specs = FSDP if mesh.num_devices > 1 else {}
    cfg = LlamaConfig(num_hidden_layers=depth, sharding=ShardingConfig(parameters=specs))
    model = build_model(cfg, torch.float32)
    specs = plan_parameter_specs(model, cfg.sharding, mesh)
    materialize(model, specs, mesh, backend, model.init_module_weights, torch.Generator())
    apply_rewriting(model, VARIANTS[variant], backend, specs, mesh)
    optimizer = build_optimizer(model, TrainerConfig(), backend)
    ids = torch.randint(0, 264, (8, 256), generator=torch.Generator().manual_seed(0))
    ids = ids.to(backend.device)
    compile_before = backend.compile_seconds()
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        backend.sync()
        backend.wait_device_ops()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    # Step 1 compiles the step; step 2 again (the optimizer state now exists); then cached.
    return {
        "first_steps_s": times[0] + times[1],
        # CPU time of this process (all threads): what tracing and compiling cost, less
        # sensitive than wall time to other work on a shared machine.
        "first_steps_cpu_s": cpu_times[0] + cpu_times[1],
        "compile_s": backend.compile_seconds() - compile_before,
        "step_s": sum(times[2:]) / len(times[2:]),
        # The first two steps' CPU time less two cached steps': tracing and compiling.
        "compile_cpu_s": cpu_times[0] + cpu_times[1] - 2 * sum(cpu_times[2:]) / len(cpu_times[2:]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--devices", type=int, default=4, help="virtual devices (fsdp mesh)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    backend = select_backend("xla", cpu_devices=args.devices)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=args.devices), MeshAxesConfig(), args.devices)
    rows = []
    print(
        f"{'depth':>5} {'variant':>9} {'compile s':>10} {'first 2 steps s':>16} "
        f"{'first 2 CPU s':>14} {'compile CPU s':>14} {'step s':>8}"
    )
    for depth in args.depths:
        for variant in args.variants:
            r = measure(backend, mesh, depth, variant, args.steps)
            rows.append((depth, variant, r))
            print(
                f"{depth:>5} {variant:>9} {r['compile_s']:>10.2f} {r['first_steps_s']:>16.2f} "
                f"{r['first_steps_cpu_s']:>14.2f} {r['compile_cpu_s']:>14.2f} "
                f"{r['step_s']:>8.3f}",
                flush=True,
            )
    deep, shallow = max(args.depths), min(args.depths)
    compile_of = {(d, v): r["compile_s"] for d, v, r in rows}
    cpu_of = {(d, v): r["compile_cpu_s"] for d, v, r in rows}
    growth = {v: compile_of[(deep, v)] / compile_of[(shallow, v)] for v in args.variants}
    cpu_growth = {v: cpu_of[(deep, v)] / cpu_of[(shallow, v)] for v in args.variants}
    print(
        f"from depth {shallow} to {deep}: compile time "
        + ", ".join(f"{v} {g:.2f}x" for v, g in growth.items())
        + "; tracing and compile CPU time "
        + ", ".join(f"{v} {g:.2f}x" for v, g in cpu_growth.items())
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "devices": args.devices,
                    "steps": args.steps,
                    "rows": [{"depth": d, "variant": v, **r} for d, v, r in rows],
                    "growth": growth,
                    "cpu_growth": cpu_growth,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
