"""Where do two runs' numbers part? `python -m tools.numerics [SHARED OVERRIDES] --a SIDE --b SIDE`

Runs this model (or transformers' Llama) twice on the same batch and the same weights, and
prints, for the embeddings, every decoder layer's attention, MLP and output, the final norm,
the logits, the loss and (--grads) every parameter's gradient, how far side b is from side a:

    python -m tools.numerics --a "backend=cpu ici_mesh.fsdp=1" --b "backend=xla ici_mesh.fsdp=4"
    python -m tools.numerics --a "backend=cpu ici_mesh.fsdp=1" --b "hf"
    python -m tools.numerics --a "backend=cpu ici_mesh.fsdp=1" \\
        --b "backend=cpu ici_mesh.fsdp=1 dtype=bfloat16" --seq-lens 128 512 2048 --tol 1e-2

A side is Hydra overrides of the training config (as on train.py's command line); `hf` as its
first word makes it transformers' LlamaForCausalLM (tools/numerics/sides.py). Overrides before
--a/--b are shared by both sides (model=..., data=...). Exit status: 0 every tensor within the
tolerance, 1 some tensor past it, 2 bad input (the message names the value).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tools.numerics.job import new_job, run_in_subprocesses
from tools.numerics.weights import INIT
from torchprime.errors import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.numerics",
        description="Compare two sides (backend, mesh, dtype, or transformers) layer by layer.",
    )
    p.add_argument("shared", nargs="*", help="Hydra overrides both sides share (model=tiny ...)")
    p.add_argument("--a", default="backend=cpu ici_mesh.fsdp=1", help="the reference side")
    p.add_argument("--b", default="backend=xla", help="the side compared with it")
    p.add_argument(
        "--weights",
        default=INIT,
        help="init (the seeded init of the config), an HF Llama folder, a checkpoint "
        "(output_dir/checkpoints/step_N) or a run's output_dir (its newest checkpoint)",
    )
    p.add_argument(
        "--seq-lens",
        type=int,
        nargs="+",
        default=[128],
        metavar="T",
        help="sequence lengths, each compared in turn (default 128)",
    )
    p.add_argument(
        "--batch-size", type=int, help="rows (default: what both meshes' data x fsdp split)"
    )
    p.add_argument("--grads", action="store_true", help="also every parameter's gradient")
    p.add_argument("--tol", type=float, default=1e-5, help="relative error that marks a tensor")
    p.add_argument(
        "--tensors", nargs="+", default=[], metavar="GLOB", help="compare only these names"
    )
    p.add_argument(
        "--perturb",
        nargs="+",
        default=[],
        metavar="PARAM=FACTOR",
        help="multiply side b's parameter PARAM by 1 + FACTOR (check the tool finds it)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the tables as JSON")
    return p.parse_args(argv)


def parse_perturb(items: list[str]) -> dict[str, float]:
    found = {}
    for item in items:
        name, _, factor = item.partition("=")
        try:
            found[name] = float(factor)
        except ValueError:
            raise ConfigError(
                f"--perturb {item}: write PARAM=FACTOR, e.g. "
                "model.layers.2.mlp.down_proj.weight=1e-3."
            ) from None
    return found


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse_args(argv)
    try:
        job = new_job(
            args.a,
            args.b,
            args.shared,
            weights=args.weights,
            seq_lens=args.seq_lens,
            batch_size=args.batch_size,
            grads=args.grads,
            tolerance=args.tol,
            tensors=args.tensors,
            perturb=parse_perturb(args.perturb),
        )
        result = run_in_subprocesses(job)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.text())
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return 1 if result.past_tolerance else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
