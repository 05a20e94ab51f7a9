"""Tokens/s of a training step of the tiny MoE (model=tiny_moe) beside a dense Llama of equal
active parameters, on eager CPU.

    python -m bench.moe_speed [--steps 8]

The MoE: 4 layers, hidden 128, 4 SwiGLU experts of width 256 in each layer, 2 a token. The
dense model: the same Llama with one SwiGLU MLP of width 512 (= 2 x 256), so each token
meets the same expert weights (1.05M active parameters on both sides; the MoE adds its 512
router weights a layer). The MoE is measured with both routings: capacity (factor 1.25, the
tiny preset's) and dropless (each expert on the tokens that chose it). The three models are
built in one process with the real path (build_model, materialize, LMTrainer.train_step, with
the optimizer); after two warm-up steps each, their steps alternate, and the median step time
of each (wall and CPU time of the process, all threads: load from other jobs hardly changes
the latter) is reported, with the ratio to the dense model (above 1: the MoE is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH, SEQ = 8, 256
SIDES = ("dense", "moe_capacity", "moe_dropless")


def _model(side: str):
    import torch

    from models import build_model
    from models.llama import LlamaConfig
    from models.mixtral import MixtralConfig

    if side == "dense":
        cfg = LlamaConfig(intermediate_size=512)
    else:
        routing = side.removeprefix("moe_")
        cfg = MixtralConfig(intermediate_size=256, moe_implementation=routing)
    return build_model(cfg, torch.float32)


def measure(steps: int) -> dict[str, Any]:
    import torch

    from torchprime.backend import select_backend
    from torchprime.materialize import materialize
    from torchprime.mesh import MeshAxesConfig, resolve_mesh
    from trainers import make_trainer
    from trainers.config import TrainerConfig
    from trainers.metrics import model_flops_per_token

    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    tmp = tempfile.TemporaryDirectory()
    trainers, active = {}, {}
    for side in SIDES:
        model = _model(side)
        specs = {n: (None,) * p.dim() for n, p in model.named_parameters()}
        generator = torch.Generator().manual_seed(0)
        materialize(model, specs, mesh, backend, model.init_module_weights, generator)
        active[side] = (model_flops_per_token(model, 0)) / 6  # parameters a token multiplies
        trainers[side] = make_trainer(
            TrainerConfig(progress_bar=False), model, backend, mesh, (), Path(tmp.name) / side,
            tokens_per_step=BATCH * SEQ,
        )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 259, (BATCH, SEQ), generator=g) for _ in range(steps + 2)]
    losses: dict[str, float] = {}

    def step(side: str, ids: torch.Tensor) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        metrics = trainers[side].train_step([{"input_ids": ids, "labels": ids}])
        losses[side] = metrics["loss"].item()
        return time.perf_counter() - start, time.process_time() - cpu

    for side in SIDES:
        for ids in batches[:2]:
            step(side, ids)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {side: [] for side in SIDES}
    for ids in batches[2:]:
        for side in SIDES:
            times[side].append(step(side, ids))
    tmp.cleanup()
    out: dict[str, Any] = {"steps": steps, "batch": [BATCH, SEQ], "sides": {}}

    def median(side: str, i: int) -> float:
        return statistics.median(t[i] for t in times[side])

    for side in SIDES:
        out["sides"][side] = {
            "median_s": median(side, 0),
            "tokens_per_s": BATCH * SEQ / median(side, 0),
            "over_dense": median("dense", 0) / median(side, 0),
            "cpu_s": median(side, 1),
            "over_dense_cpu": median("dense", 1) / median(side, 1),
            "active_parameters": active[side],
            "loss": losses[side],
        }
    return out


def print_result(r: dict[str, Any]) -> None:
    print(f"moe speed: eager CPU, batch {BATCH} x {SEQ}, median of {r['steps']} steps")
    print(
        f"{'model':<14}{'active params':>14}{'s/step':>9}{'tokens/s':>10}{'vs dense':>10}"
        f"{'CPU s/step':>12}{'vs dense':>10}"
    )
    for side, v in r["sides"].items():
        print(
            f"{side:<14}{v['active_parameters']:>14,.0f}{v['median_s']:>9.3f}"
            f"{v['tokens_per_s']:>10,.0f}{v['over_dense']:>9.2f}x{v['cpu_s']:>12.3f}"
            f"{v['over_dense_cpu']:>9.2f}x"
        )
    moe = r["sides"]["moe_capacity"]
    print(f"ratio: moe (capacity) / dense tokens/s = {moe['over_dense']:.2f}x")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.moe_speed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = measure(args.steps)
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
