"""Attention side by side, one variable at a time, and the step memory of long sequences.

    python -m bench.attention [--lengths 512 1024 2048 4096] [--reps 3]

1. The attention functions of models/llama.py on the CPU (batch 1, 8 heads of 64, float32;
   the same q, k, v for every variant): forward + backward time (median of `reps`, the
   variants interleaved) and the peak resident memory above the baseline (VmHWM, reset through
   /proc/self/clear_refs), for eager and sdpa, each with the causal mask alone, with packed
   documents as segment ids (the mask built inside attention), and with the same documents as
   a dense float32 [B, 1, T, T] bias made for the call (the path before segment ids).
2. On XLA CPU, the per-device program XLA compiled for one forward + backward of the tiny
   model (eager attention, float32), read from its buffer assignment ("Total bytes used",
   the memory one device needs for the step): document packing at T = 2048 as a dense bias
   against segment ids (one device), and one 2048-token row split over context = 1, 2, 4 (as
   many virtual devices). Each in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HEADS, HEAD_DIM = 8, 64
KERNELS = ("eager", "sdpa")
MASKS = ("causal", "segment ids", "dense bias")
XLA_VARIANTS = ("bias", "segments", "context1", "context2", "context4")
XLA_SEQ = 2048


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def documents(T: int):
    """Segment ids of a row of documents of 1/8, 3/8, 1/4 and 1/4 of the row."""
    import torch

    cuts = [T // 8, 3 * T // 8, T // 4, T - T // 8 - 3 * T // 8 - T // 4]
    return torch.cat([torch.full((n,), i + 1) for i, n in enumerate(cuts)])[None]


def attention_table(lengths: list[int], reps: int) -> list[dict[str, Any]]:
    import torch

    from models.llama import eager_attention, sdpa_attention
    from models.masks import segment_bias

    torch.set_num_threads(2)
    fns = {"eager": eager_attention, "sdpa": sdpa_attention}
    rows = []
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(1, HEADS, T, HEAD_DIM, generator=g) for _ in range(3))
        segments = documents(T)
        times: dict[tuple[str, str], list[float]] = {}
        peaks: dict[tuple[str, str], int] = {}

        def once(kernel: str, mask: str) -> tuple[float, int]:
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            baseline = _status_kib("VmRSS")
            _reset_peak()
            start = time.perf_counter()
            extra = {}
            if mask == "segment ids":
                extra["segment_ids"] = segments
            elif mask == "dense bias":
                extra["bias"] = segment_bias(segments, torch.float32)
            out = fns[kernel](qq, kk, vv, True, **extra)
            out.backward(torch.ones_like(out))
            seconds = time.perf_counter() - start
            peak = _status_kib("VmHWM") - baseline
            del out, qq, kk, vv, extra
            return seconds, peak

        variants = [(kn, m) for kn in KERNELS for m in MASKS]
        for kn, m in variants:
            once(kn, m)  # warm-up
        for _ in range(reps):
            for kn, m in variants:
                seconds, peak = once(kn, m)
                times.setdefault((kn, m), []).append(seconds)
                peaks[(kn, m)] = max(peaks.get((kn, m), 0), peak)
        for kn, m in variants:
            rows.append(
                {
                    "kernel": kn,
                    "mask": m,
                    "seq": T,
                    "median_s": statistics.median(times[(kn, m)]),
                    "peak_mib": peaks[(kn, m)] / 1024,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def xla_step(variant: str, dump: Path) -> dict[str, Any]:
    """In this process (XLA started with the right device count): compile one forward +
    backward and return the per-device bytes of its buffer assignment."""
    import torch

    from models import build_model
    from models.llama import LlamaConfig
    from models.masks import segment_bias
    from torchprime.backend import select_backend
    from torchprime.context import SequenceLayout, place_sequence_layout
    from torchprime.materialize import materialize
    from torchprime.mesh import MeshAxesConfig, resolve_mesh
    from torchprime.sharding import (
        BATCH_SPEC,
        ShardingConfig,
        plan_activation_specs,
        shard_activations,
    )
    from trainers.lm_trainer import model_inputs

    context = int(variant[-1]) if variant.startswith("context") else 1
    backend = select_backend("xla", cpu_devices=context, hlo_dump_dir=dump)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=1, context=context), MeshAxesConfig(), context)
    cfg = LlamaConfig(attention_kernel="eager", max_position_embeddings=XLA_SEQ)
    model = build_model(cfg, torch.float32)
    specs = {n: (None,) * p.dim() for n, p in model.named_parameters()}
    materialize(model, specs, mesh, backend, model.init_module_weights, torch.Generator())
    if context > 1:
        sharding = ShardingConfig(
            activations={"model.layers.*": [["data", "fsdp"], "context", None]}
        )
        shard_activations(model, plan_activation_specs(model, sharding), mesh, backend)
        place_sequence_layout(model, SequenceLayout(backend, mesh))
    ids = torch.randint(0, 264, (1, XLA_SEQ), generator=torch.Generator().manual_seed(0))
    segments = documents(XLA_SEQ)
    host = {"input_ids": ids, "labels": ids, "segment_ids": segments}
    batch = next(backend.device_loader([host], mesh, BATCH_SPEC))
    inputs = model_inputs(batch, context)
    if variant == "bias":  # the path before segment ids: a dense bias made for the step
        inputs["attention_bias"] = segment_bias(inputs.pop("segment_ids"), torch.float32)
    model(**inputs).loss.backward()
    backend.sync()
    backend.wait_device_ops()
    sizes = [
        int(m.group(1))
        for path in dump.glob("*buffer-assignment.txt")
        if (m := re.search(r"Total bytes used: (\d+)", path.read_text()))
    ]
    return {
        "variant": variant,
        "device_mib": max(sizes) / 2**20,
        "rss_mib": _status_kib("VmHWM") / 1024,
    }


def run(lengths: list[int], reps: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed large blocks go back at once
    table = _child(["--child-table", "--lengths", *map(str, lengths), "--reps", str(reps)], env)
    steps = {}
    for variant in XLA_VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            steps[variant] = _child(["--child-xla", variant, "--dump", tmp], env)
    return {"attention": table, "xla": steps, "seq": XLA_SEQ}


def _child(args: list[str], env: dict[str, str]) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.attention", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"bench.attention {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| kernel | mask | T | fwd+bwd s | peak MiB above baseline |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in result["attention"]:
        lines.append(
            f"| {r['kernel']} | {r['mask']} | {r['seq']} | {r['median_s']:.3f} | "
            f"{r['peak_mib']:.0f} |"
        )
    x = result["xla"]
    lines += [
        "",
        f"XLA CPU, tiny model, one {result['seq']}-token row, forward + backward, eager attention; "
        "bytes of the per-device program's buffer assignment:",
        "",
        "| step | per-device MiB |",
        "| --- | ---: |",
        f"| documents as a dense float32 bias (before) | {x['bias']['device_mib']:.1f} |",
        f"| documents as segment ids (now) | {x['segments']['device_mib']:.1f} |",
        f"| context=1 (1 device) | {x['context1']['device_mib']:.1f} |",
        f"| context=2 (2 devices) | {x['context2']['device_mib']:.1f} |",
        f"| context=4 (4 devices) | {x['context4']['device_mib']:.1f} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.attention", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child-table", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-xla", choices=XLA_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.child_table:
        print(json.dumps(attention_table(args.lengths, args.reps)))
        return {}
    if args.child_xla:
        print(json.dumps(xla_step(args.child_xla, args.dump)))
        return {}
    result = run(args.lengths, args.reps)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
