"""Every benchmark in one run, then BENCHMARKS.md's tables and benchmarks.png rewritten.

    python -m bench                 # or: make bench (15-25 minutes on 2 cores)
    python -m bench --only eager compiled --no-write

Each benchmark runs in its own process, as its own command would (printed before it starts),
so that one's compilations, threads or memory never weigh on the next; their tables appear as
they run. BENCHMARKS.md keeps its prose: only the parts between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->` are replaced by this run's figures; benchmarks.json keeps the raw
figures of each benchmark's last run, from which benchmarks.png is drawn.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: name → the command (after `python -m`) that measures it; the JSON path is appended.
PARTS: dict[str, list[str]] = {
    "eager": ["bench.hf_compare", "eager"],
    "compiled": ["bench.hf_compare", "compiled"],
    "xla": ["bench.hf_compare", "xla"],
    "remat": ["bench.remat_memory"],
    "loss_memory": ["bench.loss_memory"],
    "precision_speed": ["bench.precision_speed"],
    "moe_speed": ["bench.moe_speed"],
    # Depths 4 and 32, the stacked scan's target; unrolled at depth 32 would add ~10 minutes.
    "compile_scan": [
        "bench.compile_scan",
        *("--depths", "4", "32", "--steps", "4", "--variants", "scan", "stacked"),
    ],
    "data_pipeline": ["bench.data_pipeline", "--seconds", "2"],
    "distributed": ["bench.distributed_step"],
    "attention": ["bench.attention"],
    "checkpoint_save": ["bench.checkpoint_save"],
}
MFU_TARGETS = {"eager": 0.60, "compiled": 0.85}
SETUP_NAMES = {
    "eager": "eager CPU (backend=cpu)",
    "compiled": "torch.compile CPU (trainer.compile=true)",
    "xla": "XLA CPU, fsdp over 4 devices",
}


def run_part(name: str, folder: Path, steps: int | None) -> dict[str, Any]:
    command = [sys.executable, "-m", *PARTS[name]]
    if steps is not None and name in ("eager", "compiled", "xla"):
        command += ["--steps", str(steps)]
    out = folder / f"{name}.json"
    shown = " ".join(["python", *command[1:]])
    print(f"\n=== {name}: {shown}", flush=True)
    start = time.perf_counter()
    # Each child chooses its own backend: drop a parent's XLA device settings.
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    proc = subprocess.run([*command, "--json", str(out)], cwd=ROOT, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{shown} failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    result["command"] = shown
    result["seconds"] = time.perf_counter() - start
    return result


# -- BENCHMARKS.md ------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def side_by_side_md(results: dict[str, Any]) -> str:
    rows = []
    for mode in ("eager", "compiled", "xla"):
        if mode not in results:
            continue
        r = results[mode]
        ours, hf = r["sides"]["ours"], r["sides"]["HF"]
        compiles = "-" if ours["compiles"] is None else f"{ours['compiles']} / {hf['compiles']}"
        rows.append(
            [
                SETUP_NAMES[mode],
                f"{ours['median_s']:.2f}",
                f"{hf['median_s']:.2f}",
                f"**{r['ratio']:.2f}×**",
                f"{ours['min_s']:.2f} / {hf['min_s']:.2f}",
                f"{r['best_ratio']:.2f}×",
                f"{ours['cpu_s']:.2f} / {hf['cpu_s']:.2f}",
                f"{r['cpu_ratio']:.2f}×",
                f"{ours['warmup_s']:.1f} / {hf['warmup_s']:.1f}",
                compiles,
                f"{ours['first_loss']:.5f} / {hf['first_loss']:.5f}",
            ]
        )
    table = _table(
        [
            "setup",
            "ours s/step",
            "HF s/step",
            "HF / ours",
            "fastest step s (ours / HF)",
            "HF / ours, fastest",
            "CPU s/step (ours / HF)",
            "HF / ours, CPU",
            "warm-up s (ours / HF)",
            "compilations (ours / HF)",
            "first loss (ours / HF)",
        ],
        rows,
        "lrrrrrrrrrr",
    )
    any_r = next(iter(results[m] for m in ("eager", "compiled", "xla") if m in results))
    lines = [
        table,
        "",
        f"Median wall time of {any_r['steps']} timed steps after the warm-up steps, ours "
        "and HF alternating; the fastest of them; and the median CPU time of a step (all "
        "threads), which load from other jobs hardly changes. Ratio lines of this run "
        "(verdicts on the median wall time):",
    ]
    for mode in ("eager", "compiled", "xla"):
        if mode in results:
            verdict = "met" if results[mode]["ratio"] >= 1.0 else "missed"
            r = results[mode]
            lines.append(
                f"- {mode}: HF / ours = {r['ratio']:.2f}× (target ≥ 1.0×: {verdict}); "
                f"fastest steps {r['best_ratio']:.2f}×, CPU time {r['cpu_ratio']:.2f}×"
            )
    if "xla" in results:
        s = results["xla"]["sides"]
        verdict = "met" if s["ours"]["compiles"] <= s["HF"]["compiles"] else "missed"
        lines.append(
            f"- xla compilations: ours {s['ours']['compiles']}, HF {s['HF']['compiles']}"
            f" (target: fewer or equal: {verdict})"
        )
    return "\n".join(lines)


def mfu_md(results: dict[str, Any]) -> str:
    rows = []
    for mode, target in MFU_TARGETS.items():
        if mode not in results:
            continue
        r = results[mode]
        ours, hf = r["sides"]["ours"], r["sides"]["HF"]
        peak, flops = r["matmul_flops"], r["flops_per_step"]
        best, best_hf = flops / ours["min_s"] / peak, flops / hf["min_s"] / peak
        rows.append(
            [
                SETUP_NAMES[mode],
                f"{peak / 1e9:.0f}",
                f"{flops / ours['min_s'] / 1e9:.0f}",
                f"**{best:.0%}**",
                f"{best_hf:.0%}",
                f"{ours['mfu']:.0%} / {hf['mfu']:.0%}",
                f"{r['model_matmul_flops'] / peak:.0%}",
                f"≥ {target:.0%}",
                "met" if best >= target else "missed",
            ]
        )
    if not rows:
        return "(not measured in this run)"
    any_r = next(iter(results[m] for m in MFU_TARGETS if m in results))
    return "\n".join(
        [
            _table(
                [
                    "setup",
                    "matmul GFLOP/s",
                    "ours GFLOP/s (fastest step)",
                    "ours MFU",
                    "HF MFU",
                    "MFU at the median step (ours / HF)",
                    "ceiling (the model's products alone)",
                    "target",
                    "verdict",
                ],
                rows,
                "lrrrrrrrl",
            ),
            "",
            f"Model FLOPs of one step: {any_r['flops_per_step'] / 1e9:.0f} GFLOP (batch 4 × 256). "
            "The matrix-multiply figure is the best of 10 float32 2048² products, measured in the "
            "same process before and after the steps; being a best case, it is compared with the "
            "fastest step (the verdict), and the median step's MFU is shown beside it. The "
            "ceiling is "
            "the FLOP/s of the step's own matrix products (every linear layer's forward and two "
            "backward products at 1024 tokens, timed alone) over the peak: the MFU of a step that "
            "spent no time on anything else.",
        ]
    )


def remat_md(r: dict[str, Any]) -> str:
    rows = [
        [name, f"{v['baseline_mib']:,.0f}", f"{v['forward_mib']:,.0f}", f"{v['step_mib']:,.0f}"]
        for name, v in r["variants"].items()
    ]
    verdict = "met" if r["forward_ratio"] >= 2.0 else "missed"
    return "\n".join(
        [
            _table(
                ["variant", "baseline MiB", "forward peak above it MiB", "step peak above it MiB"],
                rows,
                "lrrr",
            ),
            "",
            f"Activation memory without / with remat: **{r['forward_ratio']:.2f}×** (target ≥ 2×: "
            f"{verdict}); the whole step's peak: {r['step_ratio']:.2f}×.",
        ]
    )


def loss_memory_md(r: dict[str, Any]) -> str:
    rows = [
        [
            name,
            f"{v['baseline_mib']:,.0f}",
            f"{v['forward_mib']:,.0f}",
            f"{v['step_mib']:,.0f}",
            f"{v['first_loss']:.5f}",
        ]
        for name, v in r["variants"].items()
    ]
    verdict = "met" if r["step_ratio"] >= 3.0 else "missed"
    return "\n".join(
        [
            _table(
                [
                    "loss",
                    "baseline MiB",
                    "forward peak above it MiB",
                    "step peak above it MiB",
                    "first loss",
                ],
                rows,
                "lrrrr",
            ),
            "",
            f"Step peak above the baseline, whole / chunks of {r['chunk']}: "
            f"**{r['step_ratio']:.2f}×** (target ≥ 3×: {verdict}); the forward's: "
            f"{r['forward_ratio']:.2f}×.",
        ]
    )


def precision_speed_md(r: dict[str, Any]) -> str:
    rows = [
        [
            setup,
            f"{v['float32']['tokens_per_s']:,.0f}",
            f"{v['bfloat16']['tokens_per_s']:,.0f}",
            f"{v['bf16_over_fp32']:.2f}×",
            f"{v['float32']['loss']:.4f} / {v['bfloat16']['loss']:.4f}",
        ]
        for setup, v in r["setups"].items()
    ]
    return _table(
        ["setup", "float32 tokens/s", "bfloat16 tokens/s", "bf16 / fp32", "last loss fp32 / bf16"],
        rows,
        "lrrrr",
    )


def compile_scan_md(r: dict[str, Any]) -> str:
    rows = [
        [
            str(x["depth"]),
            x["variant"],
            f"{x['compile_s']:.1f}",
            f"{x['first_steps_s']:.1f}",
            f"{x['first_steps_cpu_s']:.1f}",
            f"{x['compile_cpu_s']:.1f}",
            f"{x['step_s']:.2f}",
        ]
        for x in r["rows"]
    ]
    depths = sorted({x["depth"] for x in r["rows"]})
    header = [
        "depth",
        "variant",
        "compile s",
        "first 2 steps s",
        "first 2 steps CPU s",
        "trace + compile CPU s",
        "step s",
    ]
    return "\n".join(
        [
            _table(header, rows, "rlrrrrr"),
            "",
            f"From depth {depths[0]} to {depths[-1]}: compile time "
            + ", ".join(f"{v} {g:.2f}×" for v, g in r["growth"].items())
            + "; tracing and compiling CPU time "
            + ", ".join(f"{v} {g:.2f}×" for v, g in r["cpu_growth"].items())
            + ".",
        ]
    )


def data_pipeline_md(r: dict[str, Any]) -> str:
    packings = list(dict.fromkeys(x["packing"] for x in r["rows"]))
    names = list(dict.fromkeys(x["tokenizer"] for x in r["rows"]))
    rate = {(x["tokenizer"], x["packing"]): x["tokens_per_sec"] for x in r["rows"]}
    label = {n: ("byte" if n == "byte" else f"BPE, vocabulary {r['bpe_vocab']}") for n in names}
    rows = [[label[n], *(f"{rate[(n, p)]:,.0f}" for p in packings)] for n in names]
    verdict = "met" if r["ratio"] >= 10 else "missed"
    return "\n".join(
        [
            _table(["tokenizer", *packings], rows, "l" + "r" * len(packings)),
            "",
            f"Training: {r['train_tokens_per_sec']:,.0f} tokens/s. Slowest pipeline / training = "
            f"{r['ratio']:,.0f}× (target ≥ 10×: {verdict}).",
        ]
    )


def distributed_md(r: dict[str, Any]) -> str:
    rows = [
        ["1 process (backend=cpu, ici_mesh.fsdp=1)", f"{r['one_process_s']:.3f}", "1.00×"],
        [
            "2 processes (torchrun, gloo, ici_mesh.fsdp=2)",
            f"{r['two_processes_s']:.3f}",
            f"{r['ratio']:.2f}×",
        ],
    ]
    return "\n".join(
        [
            _table(["setup", "median s/step", "vs 1 process"], rows, "lrr"),
            "",
            f"Median of {r['rounds']} interleaved runs of {r['steps']} steps per side (the first "
            f"{2} steps of each left out), batch {r['batch']} tokens; the losses of both sides "
            f"differed by at most {r['max_loss_gap']:.1e}. Reported only (no target). Load "
            f"average at the end: {r.get('load_average', float('nan')):.1f} on "
            f"{os.cpu_count()} cores: with other work on the machine the 1-process side's two "
            "OpenMP threads wait on each other, the 2 single-threaded processes much less, so "
            "compare figures from a quiet machine only.",
        ]
    )


def attention_md(r: dict[str, Any]) -> str:
    from bench.attention import markdown

    return markdown(r)


def checkpoint_save_md(r: dict[str, Any]) -> str:
    rows = [
        ["synchronous (async_save=false)", f"{r['sync_save_s']:.3f}"],
        ["asynchronous (async_save=true)", f"{r['async_save_s']:.3f}"],
    ]
    return "\n".join(
        [
            _table(["save", "loop time added per save, s"], rows, "lr"),
            "",
            f"Median of {r['rounds']} interleaved runs of {r['steps']} steps per side, a "
            f"checkpoint every {r['interval']} steps; a plain step took {r['step_s']:.3f} s. "
            f"Per run: sync {', '.join(f'{c:.3f}' for c in r['sync_runs_s'])} s, async "
            f"{', '.join(f'{c:.3f}' for c in r['async_runs_s'])} s. The losses of both sides "
            f"differed by at most {r['max_loss_gap']:.1e}. Load average at the end: "
            f"{r.get('load_average', float('nan')):.1f} on {os.cpu_count()} cores.",
        ]
    )


def run_md(results: dict[str, Any], total_s: float) -> str:
    import torch

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"Last `python -m bench`: {when}, {os.cpu_count()} cores, torch "
        f"{torch.__version__.split('+')[0]}, {len(results)} benchmarks in {total_s / 60:.1f} "
        f"minutes; load average at the end {load}."
    )


def moe_speed_md(r: dict[str, Any]) -> str:
    rows = [
        [
            side,
            f"{v['active_parameters']:,.0f}",
            f"{v['tokens_per_s']:,.0f}",
            f"{v['over_dense']:.2f}×",
            f"{v['cpu_s']:.2f}",
            f"{v['over_dense_cpu']:.2f}×",
            f"{v['loss']:.4f}",
        ]
        for side, v in r["sides"].items()
    ]
    header = ["model", "active parameters", "tokens/s", "vs dense", "CPU s/step", "vs dense, CPU"]
    return _table([*header, "last loss"], rows, "lrrrrrr")


SECTIONS: dict[str, tuple[tuple[str, ...], Callable[..., str]]] = {
    "side_by_side": (("eager", "compiled", "xla"), side_by_side_md),
    "mfu": (("eager", "compiled"), mfu_md),
    "remat": (("remat",), remat_md),
    "loss_memory": (("loss_memory",), loss_memory_md),
    "precision_speed": (("precision_speed",), precision_speed_md),
    "moe_speed": (("moe_speed",), moe_speed_md),
    "compile_scan": (("compile_scan",), compile_scan_md),
    "data_pipeline": (("data_pipeline",), data_pipeline_md),
    "distributed": (("distributed",), distributed_md),
    "attention": (("attention",), attention_md),
    "checkpoint_save": (("checkpoint_save",), checkpoint_save_md),
}


def write_markdown(path: Path, results: dict[str, Any], total_s: float) -> None:
    text = path.read_text(encoding="utf-8")
    blocks = {"run": run_md(results, total_s)}
    for name, (parts, render) in SECTIONS.items():
        if not any(p in results for p in parts):
            continue  # not run this time: keep the last figures
        if len(parts) == 1:
            blocks[name] = render(results[parts[0]])
        else:
            blocks[name] = render({p: results[p] for p in parts if p in results})
    for name, block in blocks.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(
                f"{path}: no <!-- bench:{name} --> ... <!-- /bench:{name} --> "
                "markers to write this run's figures between."
            )
        text = pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text)
    path.write_text(text, encoding="utf-8")


# -- benchmarks.png -----------------------------------------------------------------------
def write_chart(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("eager", "compiled", "xla") if m in results]
    panels = [
        p
        for p in ("time", "mfu", "remat")
        if (p == "time" and modes)
        or (p == "mfu" and any(m in results for m in MFU_TARGETS))
        or (p == "remat" and "remat" in results)
    ]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    width = 0.38
    for ax, panel in zip(axes[0], panels):
        if panel == "time":
            x = range(len(modes))
            for i, side in enumerate(("ours", "HF")):
                values = [results[m]["sides"][side]["median_s"] for m in modes]
                ax.bar([j + (i - 0.5) * width for j in x], values, width, label=side)
            ax.set_xticks(list(x), modes)
            ax.set_ylabel("median s / step (lower is better)")
            ax.set_title("training step, batch 4 × 256")
        elif panel == "mfu":
            mfu_modes = [m for m in MFU_TARGETS if m in results]
            x = range(len(mfu_modes))
            for i, side in enumerate(("ours", "HF")):
                values = [
                    100
                    * results[m]["flops_per_step"]
                    / results[m]["sides"][side]["min_s"]
                    / results[m]["matmul_flops"]
                    for m in mfu_modes
                ]
                ax.bar([j + (i - 0.5) * width for j in x], values, width, label=side)
            for j, m in enumerate(mfu_modes):
                target = 100 * MFU_TARGETS[m]
                ax.hlines(target, j - 0.45, j + 0.45, colors="k", linestyles="dashed")
            ax.set_xticks(list(x), mfu_modes)
            ax.set_ylabel("MFU %, fastest step (dashed: target)")
            ax.set_title("model FLOPs utilization, CPU")
        else:
            r = results["remat"]
            kinds = ("forward_mib", "step_mib")
            x = range(len(kinds))
            for i, variant in enumerate(r["variants"]):
                values = [r["variants"][variant][k] for k in kinds]
                ax.bar([j + (i - 0.5) * width for j in x], values, width, label=variant)
            ax.set_xticks(list(x), ["forward peak", "step peak"])
            ax.set_ylabel("MiB above the baseline RSS")
            ax.set_title(f"activation memory, depth {r['depth']}")
        ax.legend(loc="lower right")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(PARTS),
        default=list(PARTS),
        help="run these benchmarks only (the others' figures are kept)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps of each side in the HF comparisons (default 7)",
    )
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="print the tables only; leave BENCHMARKS.md and the chart alone",
    )
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--chart", type=Path, default=ROOT / "benchmarks.png")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            results[name] = run_part(name, Path(tmp), args.steps)
    total = time.perf_counter() - start
    print(f"\n=== all done in {total / 60:.1f} minutes")
    for name, r in results.items():
        print(f"  {name}: {r['seconds']:.0f} s")
    if args.no_write:
        return
    # The raw figures next to the tables; a run of some benchmarks only (--only) keeps the
    # others' last figures, in the tables and in the chart.
    raw = args.markdown.with_name("benchmarks.json")
    when = datetime.datetime.now().isoformat(timespec="seconds")
    merged = json.loads(raw.read_text()) if raw.is_file() else {}
    merged.update({name: {**r, "measured_at": when} for name, r in results.items()})
    raw.write_text(json.dumps(merged, indent=1) + "\n")
    write_markdown(args.markdown, results, total)
    write_chart(args.chart, merged)
    print(f"wrote {args.markdown}, {raw} and {args.chart}")


if __name__ == "__main__":
    main()
