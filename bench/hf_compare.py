"""Training step time side by side with what users would pick instead: HF transformers'
LlamaForCausalLM with torch.optim.AdamW, same shapes, same weights, same batches.

    python -m bench.hf_compare eager      # our trainer on backend=cpu vs HF, plain PyTorch
    python -m bench.hf_compare compiled   # trainer.compile=true vs HF model.compile()
    python -m bench.hf_compare xla        # XLA SPMD, fsdp over 4 virtual CPU devices

Our side is the trainer's own step (models.build_model, materialize, the model rewriting,
the trainer's train_step with its clipping, lr schedule and skip logic); HF's side is the loop an HF
user writes (forward with labels, backward, AdamW step, zero_grad) with the KV cache off. Both
start from the same weights (ours, loaded into HF by name), so their first losses must agree.
Steps alternate (ours, HF, ours, HF, ...) so that drifting load on a shared machine hits both
alike; the table reports the median, the fastest step, and the median CPU time of a step (which
other jobs on the machine hardly change). On CPU, model FLOPs utilization (trainer.metrics'
formula) is measured against the matrix-multiply FLOP/s of the same process (bench.mfu).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compile from scratch, both sides: inductor's on-disk cache would make the warm-up time depend
# on what ran before on this machine.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

from bench.shapes import BATCH, SEQ, SHAPES  # noqa: E402

LR, BETAS, WEIGHT_DECAY = 3e-3, (0.9, 0.95), 0.1
FSDP_PRESET = Path(__file__).resolve().parent.parent / "configs/model/sharding/fsdp.yaml"
MODES = ("eager", "compiled", "xla")
#: Untimed steps first: allocator and kernels warm (eager), compilation (compiled, XLA: the
#: second XLA step compiles again once the optimizer state exists).
WARMUP = {"eager": 2, "compiled": 2, "xla": 3}


def fsdp_sharding():
    from omegaconf import OmegaConf

    from torchprime.sharding import ShardingConfig

    raw = OmegaConf.to_container(OmegaConf.load(FSDP_PRESET))
    return ShardingConfig(parameters=raw["parameters"], activations=raw.get("activations", {}))


class Ours:
    """The trainer's step on our Llama, set up as train.py sets it up."""

    name = "ours"

    def __init__(self, mode: str, backend, mesh, workdir: Path):
        from models import build_model
        from models.llama import LlamaConfig
        from torchprime.materialize import materialize
        from torchprime.rewriting import RematConfig, apply_rewriting
        from torchprime.sharding import (
            ShardingConfig,
            plan_activation_specs,
            plan_parameter_specs,
            shard_activations,
        )
        from trainers import make_trainer
        from trainers.config import OptimizerConfig, TrainerConfig

        sharding = fsdp_sharding() if backend.is_xla else ShardingConfig()
        cfg = LlamaConfig(**SHAPES, sharding=sharding)
        self.model = build_model(cfg, torch.float32)
        specs = plan_parameter_specs(self.model, cfg.sharding, mesh)
        materialize(
            self.model,
            specs,
            mesh,
            backend,
            self.model.init_module_weights,
            torch.Generator().manual_seed(0),
        )
        if backend.is_xla:
            shard_activations(
                self.model, plan_activation_specs(self.model, sharding), mesh, backend
            )
        apply_rewriting(self.model, RematConfig(), backend)
        trainer_cfg = TrainerConfig(
            compile=mode == "compiled",
            progress_bar=False,
            optimizer=OptimizerConfig(
                lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY
            ),
        )
        self.trainer = make_trainer(
            trainer_cfg, self.model, backend, mesh, (), workdir, tokens_per_step=BATCH * SEQ
        )
        self.trainer.model.train()

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.trainer.train_step([batch])["loss"]


class HF:
    """transformers' LlamaForCausalLM and torch.optim.AdamW, the loop of its documentation."""

    name = "HF"

    def __init__(self, mode: str, backend, mesh, weights: dict[str, torch.Tensor]):
        import transformers

        cfg = transformers.LlamaConfig(**SHAPES, use_cache=False, attn_implementation="sdpa")
        self.model = transformers.LlamaForCausalLM(cfg)
        self.model.load_state_dict(weights)
        if backend.is_xla:
            from torchprime.sharding import plan_parameter_specs

            # The same layout as ours: the parameter names are the same.
            specs = plan_parameter_specs(self.model, fsdp_sharding(), mesh)
            self.model.to(backend.device)
            for name, p in self.model.named_parameters():
                backend.mark_sharding(p, mesh, specs[name])
        if mode == "compiled":
            self.model.compile()
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY
        )

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def timed(backend, step: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor, int]:
    """Wall and CPU seconds of one step until its values exist, its loss, and the compilations
    it caused. CPU time (all threads of this process) hardly changes when other jobs load the
    machine, while wall time does: it is the steadier measure of the work a step does."""
    before = backend.compile_count() or 0
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step()
    backend.sync()
    backend.wait_device_ops()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu, loss, (backend.compile_count() or 0) - before


def warm_up_compiler() -> None:
    """Pay torch.compile's once-a-process costs (the compile workers, the C++ toolchain check,
    the kernels' common header) before either side compiles, so that whichever goes first is
    not charged for them."""
    x = torch.randn(8, 8, requires_grad=True)
    torch.compile(lambda t: (t.sin() * 2).sum())(x).backward()


def run(mode: str, warmup: int, steps: int) -> dict[str, Any]:
    from bench.mfu import linear_shapes, matmul_flops, model_matmul_flops
    from torchprime.backend import select_backend
    from torchprime.mesh import MeshAxesConfig, resolve_mesh
    from torchprime.sharding import BATCH_SPEC
    from trainers.metrics import model_flops_per_token

    if mode == "xla":
        backend = select_backend("xla", cpu_devices=4)
        mesh = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), backend.device_count)
    else:
        backend = select_backend("cpu", cpu_devices=1)
        mesh = resolve_mesh(MeshAxesConfig(fsdp=1), MeshAxesConfig(), None)
    peak_before = None if backend.is_xla else matmul_flops()
    if mode == "compiled":
        warm_up_compiler()
    with tempfile.TemporaryDirectory() as tmp:
        ours = Ours(mode, backend, mesh, Path(tmp))
        host_weights = {k: v.detach().cpu().clone() for k, v in ours.model.state_dict().items()}
        hf = HF(mode, backend, mesh, host_weights)
        del host_weights
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(warmup + steps):
            ids = torch.randint(0, SHAPES["vocab_size"], (BATCH, SEQ), generator=g)
            batch = {"input_ids": ids, "labels": ids}
            if backend.is_xla:
                batch = {k: backend.place(v, mesh, BATCH_SPEC) for k, v in batch.items()}
            batches.append(batch)
        sides = (ours, hf)
        record = {
            s.name: {"times": [], "cpu": [], "losses": [], "compiles": 0, "warmup_s": 0.0}
            for s in sides
        }
        for i, batch in enumerate(batches):
            last = {}
            for side in sides:
                seconds, cpu, loss, compiles = timed(backend, lambda: side.step(batch))
                last[side.name] = seconds
                r = record[side.name]
                r["compiles"] += compiles
                r["losses"].append(loss.item())
                if i < warmup:
                    r["warmup_s"] += seconds
                else:
                    r["times"].append(seconds)
                    r["cpu"].append(cpu)
            kind = "warm-up" if i < warmup else "timed"
            print(
                f"  {mode} step {i + 1}/{len(batches)} ({kind}): "
                + ", ".join(f"{name} {t:.2f} s" for name, t in last.items()),
                flush=True,
            )
        flops_per_step = model_flops_per_token(ours.model, SEQ) * BATCH * SEQ
    peak = ceiling = None
    if peak_before is not None:
        peak = max(peak_before, matmul_flops())
        ceiling = model_matmul_flops(
            linear_shapes(
                SHAPES["vocab_size"],
                SHAPES["hidden_size"],
                SHAPES["intermediate_size"],
                SHAPES["num_hidden_layers"],
            ),
            BATCH * SEQ,
        )
    result: dict[str, Any] = {
        "mode": mode,
        "warmup": warmup,
        "steps": steps,
        "flops_per_step": flops_per_step,
        "matmul_flops": peak,
        "model_matmul_flops": ceiling,
        "threads": torch.get_num_threads(),
        "sides": {},
    }
    for name, r in record.items():
        median = statistics.median(r["times"])
        result["sides"][name] = {
            "median_s": median,
            "min_s": min(r["times"]),
            "max_s": max(r["times"]),
            "cpu_s": statistics.median(r["cpu"]),
            "tokens_per_sec": BATCH * SEQ / median,
            "warmup_s": r["warmup_s"],
            "compiles": r["compiles"] if backend.is_xla else None,
            "first_loss": r["losses"][0],
            "mfu": flops_per_step / median / peak if peak else None,
        }
    ours, hf = result["sides"]["ours"], result["sides"]["HF"]
    result["ratio"] = hf["median_s"] / ours["median_s"]
    result["cpu_ratio"] = hf["cpu_s"] / ours["cpu_s"]
    result["best_ratio"] = hf["min_s"] / ours["min_s"]
    return result


def print_result(r: dict[str, Any]) -> None:
    print(
        f"\n{r['mode']}: Llama vocab {SHAPES['vocab_size']}, hidden {SHAPES['hidden_size']}, "
        f"{SHAPES['num_hidden_layers']} layers, batch {BATCH} x {SEQ}, float32, "
        f"{r['warmup']} warm-up + {r['steps']} timed steps each, interleaved"
    )
    print(
        f"{'side':<6}{'median s':>10}{'min s':>8}{'max s':>8}{'CPU s':>8}{'tokens/s':>10}"
        f"{'warm-up s':>11}{'compiles':>10}{'MFU':>7}{'loss 1':>10}"
    )
    for name, s in r["sides"].items():
        compiles = "-" if s["compiles"] is None else str(s["compiles"])
        mfu = "-" if s["mfu"] is None else f"{s['mfu']:.0%}"
        print(
            f"{name:<6}{s['median_s']:>10.3f}{s['min_s']:>8.3f}{s['max_s']:>8.3f}{s['cpu_s']:>8.2f}"
            f"{s['tokens_per_sec']:>10,.0f}{s['warmup_s']:>11.1f}{compiles:>10}{mfu:>7}"
            f"{s['first_loss']:>10.5f}"
        )
    if r["matmul_flops"]:
        print(
            f"matrix multiply: {r['matmul_flops'] / 1e9:.0f} GFLOP/s peak, "
            f"{r['model_matmul_flops'] / 1e9:.0f} GFLOP/s for the model's own products "
            f"(MFU ceiling {r['model_matmul_flops'] / r['matmul_flops']:.0%}); model "
            f"{r['flops_per_step'] / 1e9:.0f} GFLOP a step"
        )
    print(
        f"ratio: {r['mode']} HF / ours median step time = {r['ratio']:.2f}x (target >= 1.0x); "
        f"fastest steps {r['best_ratio']:.2f}x, CPU time {r['cpu_ratio']:.2f}x"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hf_compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("mode", choices=MODES)
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps of each side (default: 2; 3 on XLA)"
    )
    parser.add_argument("--steps", type=int, default=7, help="timed steps of each side")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.mode, args.warmup or WARMUP[args.mode], args.steps)
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
