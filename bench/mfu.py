"""The matrix-multiply FLOP/s of this CPU: the peak model FLOPs utilization is measured against.

    python -m bench.mfu [--size 2048] [--repeats 10]

MFU here = model FLOPs of a training step (trainers.metrics.model_flops_per_token, the formula
the trainer logs and the README documents) / step time / this figure, measured in the same
process as the steps (bench.hf_compare), so that a busy machine lowers both alike.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch


def matmul_flops(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of `repeats` square float32 matrix products (2·n³ FLOPs each), after one
    untimed product."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g, dtype=dtype)
    b = torch.randn(size, size, generator=g, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mfu", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    flops = matmul_flops(args.size, args.repeats)
    print(f"float32 matrix multiply {args.size} x {args.size}, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads: {flops / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
