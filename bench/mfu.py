"""The matrix-multiply FLOP/s of this CPU: the peak model FLOPs utilization is measured against.

    python -m bench.mfu [--size 2048] [--repeats 10]

MFU here = model FLOPs of a training step (trainers.metrics.model_flops_per_token, the formula
the trainer logs and the README documents) / step time / this figure, measured in the same
process as the steps (bench.hf_compare), so that a busy machine lowers both alike.
"""

from __future__ import annotations

import argparse
import time

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


def linear_shapes(
    vocab: int, hidden: int, intermediate: int, layers: int
) -> list[tuple[int, int, int]]:
    """(in, out, count) of the Llama's linear layers (attention without grouping)."""
    return [
        (hidden, hidden, 4 * layers),
        (hidden, intermediate, 2 * layers),
        (intermediate, hidden, layers),
        (hidden, vocab, 1),
    ]


def model_matmul_flops(shapes: list[tuple[int, int, int]], tokens: int, repeats: int = 3) -> float:
    """FLOP/s of the training step's own matrix products: for every linear layer, the forward
    x Wᵀ and backward's two (gradient of the input, of the weight), best of `repeats` each,
    weighted by how often the step runs them. The ceiling of MFU if nothing else took time."""
    g = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    for n_in, n_out, count in shapes:
        x = torch.randn(tokens, n_in, generator=g)
        w = torch.randn(n_out, n_in, generator=g)
        dy = torch.randn(tokens, n_out, generator=g)
        for product in (lambda: x @ w.T, lambda: dy @ w, lambda: dy.T @ x):
            product()
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - start)
            flops += count * 2 * tokens * n_in * n_out
            seconds += count * best
    return flops / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mfu", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    flops = matmul_flops(args.size, args.repeats)
    print(
        f"float32 matrix multiply {args.size} x {args.size}, best of {args.repeats}, "
        f"{torch.get_num_threads()} threads: {flops / 1e9:.0f} GFLOP/s"
    )
    from bench.shapes import BATCH, SEQ, SHAPES

    shapes = linear_shapes(
        SHAPES["vocab_size"],
        SHAPES["hidden_size"],
        SHAPES["intermediate_size"],
        SHAPES["num_hidden_layers"],
    )
    model = model_matmul_flops(shapes, BATCH * SEQ)
    print(
        f"the linear layers' products of bench.hf_compare's step ({BATCH * SEQ} tokens): "
        f"{model / 1e9:.0f} GFLOP/s, {model / flops:.0%} of the peak"
    )


if __name__ == "__main__":
    main()
