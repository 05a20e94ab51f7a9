"""Tokens/s of a training step with float32 compute and with bfloat16 compute (float32 master
weights under autocast, precision.compute=bfloat16), on eager CPU and on XLA CPU (fsdp over 4
virtual devices).

    python -m bench.precision_speed [--steps 6]

Each setup runs in its own process with both models built there; after two warm-up steps each
(XLA compiles), their steps alternate, and the median step time of each side is reported.
Shapes: vocab 32,000, hidden 256, 4 layers, batch 4 x 128. A report, no target: a CPU has no
bfloat16 matrix units worth the name, so bfloat16 may well be slower here; the point on a TPU
is the MXU's bfloat16 rate and the halved activation memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.child import run_child

SHAPES = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
)
BATCH, SEQ = 4, 128
SETUPS = ("eager", "xla")
SIDES = ("float32", "bfloat16")


def measure(setup: str, steps: int) -> dict[str, Any]:
    import torch

    from models import build_model
    from models.llama import LlamaConfig
    from torchprime.backend import select_backend
    from torchprime.materialize import materialize
    from torchprime.mesh import MeshAxesConfig, resolve_mesh
    from torchprime.precision import Precision, autocast_forward
    from torchprime.rewriting import RematConfig, apply_rewriting
    from trainers import make_trainer
    from trainers.config import TrainerConfig

    xla = setup == "xla"
    backend = select_backend("xla" if xla else "cpu", cpu_devices=4 if xla else 1)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4 if xla else 1), MeshAxesConfig(), None)
    ids = torch.randint(0, SHAPES["vocab_size"], (BATCH, SEQ), generator=torch.Generator())
    batch = {"input_ids": ids.to(backend.device), "labels": ids.to(backend.device)}
    trainers, tmp = {}, tempfile.TemporaryDirectory()
    for side in SIDES:
        model = build_model(LlamaConfig(**SHAPES), torch.float32)
        lead = "fsdp" if xla else None
        specs = {n: (lead,) + (None,) * (p.dim() - 1) for n, p in model.named_parameters()}
        generator = torch.Generator().manual_seed(0)
        materialize(model, specs, mesh, backend, model.init_module_weights, generator)
        apply_rewriting(model, RematConfig(), backend)
        precision = Precision(torch.float32, getattr(torch, side), None)
        autocast_forward(model, precision, backend.device.type)
        trainers[side] = make_trainer(
            TrainerConfig(progress_bar=False), model, backend, mesh, (), Path(tmp.name) / side,
            tokens_per_step=BATCH * SEQ,
        )  # fmt: skip

    def step(side: str) -> float:
        start = time.perf_counter()
        metrics = trainers[side].train_step([batch])
        backend.sync()
        backend.wait_device_ops()
        seconds = time.perf_counter() - start
        losses[side] = metrics["loss"].item()
        return seconds

    losses: dict[str, float] = {}
    for side in SIDES:
        for _ in range(2):
            step(side)  # warm-up (XLA: the step's compilations)
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for _ in range(steps):
        for side in SIDES:
            times[side].append(step(side))
    out = {}
    for side in SIDES:
        median = statistics.median(times[side])
        out[side] = {"median_s": median, "tokens_per_s": BATCH * SEQ / median, "loss": losses[side]}
    tmp.cleanup()
    return out


def run(steps: int) -> dict[str, Any]:
    result: dict[str, Any] = {"steps": steps, "setups": {}}
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    for setup in SETUPS:
        r = run_child("precision_speed", setup, "--steps", str(steps), env=env)
        r["bf16_over_fp32"] = r["bfloat16"]["tokens_per_s"] / r["float32"]["tokens_per_s"]
        result["setups"][setup] = r
    return result


def print_result(r: dict[str, Any]) -> None:
    print(
        f"precision speed: vocab {SHAPES['vocab_size']:,}, hidden {SHAPES['hidden_size']}, "
        f"{SHAPES['num_hidden_layers']} layers, batch {BATCH} x {SEQ}; float32 master weights"
    )
    print(f"{'setup':<7}{'fp32 tok/s':>12}{'bf16 tok/s':>12}{'bf16/fp32':>11}{'losses':>22}")
    for setup, v in r["setups"].items():
        f, b = v["float32"], v["bfloat16"]
        print(
            f"{setup:<7}{f['tokens_per_s']:>12,.0f}{b['tokens_per_s']:>12,.0f}"
            f"{v['bf16_over_fp32']:>10.2f}x{f['loss']:>11.4f}{b['loss']:>11.4f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.precision_speed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps)))
        return {}
    result = run(args.steps)
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
