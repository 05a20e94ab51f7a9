"""Is the input pipeline fast enough? Tokens/s of the whole host pipeline (read, tokenize,
pack, collate, and the state snapshot the trainer takes after every batch) on the default
corpus, for the byte tokenizer and a BPE trained here first, against training's tokens/s.

    python -m bench.data_pipeline                         # measures training here too
    python -m bench.data_pipeline --train-tokens-per-sec 250000   # a pod's figure, per host

Training's figure defaults to the tiny model (models.LlamaConfig()) trained eagerly on this
CPU at batch 8 x 256, float32, AdamW. The pipeline should be at least 10x faster than
training, so that it never makes a step wait even on a busy host.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from data.config import DataConfig
from data.pipeline import TextBatches
from data.tokenizers import build_tokenizer

TARGET = 10.0


def pipeline_tokens_per_sec(cfg: DataConfig, batch_size: int, seconds: float) -> tuple[float, int]:
    """Row tokens (batch x block, padding included) per second, after the first batch (which
    opens the sources); the state is taken after every batch as the trainer does."""
    batches = TextBatches(cfg, build_tokenizer(cfg.tokenizer), batch_size)
    next(batches)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        next(batches)
        batches.state_dict()
        n += 1
    batches.close()
    return n * batch_size * cfg.block_size / elapsed, n


def training_tokens_per_sec(batch_size: int, block_size: int, steps: int) -> float:
    """The tiny Llama trained eagerly on the CPU: forward, backward, AdamW, on real batches
    (read before the clock starts, so this is training alone)."""
    from models import build_model
    from models.llama import LlamaConfig

    model = build_model(LlamaConfig(), torch.float32).to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    model.tie_weights()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    cfg = DataConfig(block_size=block_size)
    source = TextBatches(cfg, build_tokenizer("byte"), batch_size)
    batches = [next(source) for _ in range(steps + 2)]
    source.close()

    def step(batch):
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for batch in batches[:2]:  # warm-up: allocator, kernels, optimizer state
        step(batch)
    start = time.perf_counter()
    for batch in batches[2:]:
        loss = step(batch)
    loss.item()
    return steps * batch_size * block_size / (time.perf_counter() - start)


def train_bpe_tokenizer(folder: Path, vocab_size: int, max_bytes: int) -> tuple[Path, float]:
    from tools.train_tokenizer import corpus_texts, limit_bytes, train_bpe

    start = time.perf_counter()
    out = train_bpe(limit_bytes(corpus_texts("stdlib"), max_bytes), vocab_size, folder / "bpe")
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.data_pipeline", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--train-tokens-per-sec",
        type=float,
        default=None,
        help="training's tokens/s on one host (default: measure here)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="host batch (rows)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=4.0, help="time each setup this long")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--bpe-vocab", type=int, default=8192)
    parser.add_argument("--bpe-train-bytes", type=int, default=3_000_000)
    parser.add_argument("--packings", default="concat,document,pad")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:  # "Resolving data files" bars at every pass would clutter the table
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass

    print(
        f"data pipeline on the default corpus (stdlib), host batch {args.batch_size} x "
        f"{args.block_size}, {torch.get_num_threads()} torch threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        bpe, secs = train_bpe_tokenizer(Path(tmp), args.bpe_vocab, args.bpe_train_bytes)
        print(
            f"(BPE: vocabulary {args.bpe_vocab} trained on {args.bpe_train_bytes / 1e6:.0f} MB "
            f"in {secs:.1f} s)\n"
        )
        print(f"{'tokenizer':<12}{'packing':<10}{'tokens/s':>14}{'batches':>10}")
        results = []
        for name, tokenizer in (("byte", "byte"), (f"bpe{args.bpe_vocab}", str(bpe))):
            for packing in args.packings.split(","):
                cfg = DataConfig(tokenizer=tokenizer, packing=packing, block_size=args.block_size)
                rate, n = pipeline_tokens_per_sec(cfg, args.batch_size, args.seconds)
                results.append((name, packing, rate))
                print(f"{name:<12}{packing:<10}{rate:>14,.0f}{n:>10,}")

    if args.train_tokens_per_sec is None:
        train = training_tokens_per_sec(args.batch_size, args.block_size, args.train_steps)
        print(
            f"\ntraining: tiny Llama (LlamaConfig()), eager CPU, float32, AdamW, batch "
            f"{args.batch_size} x {args.block_size}: {train:,.0f} tokens/s"
        )
    else:
        train = args.train_tokens_per_sec
        print(f"\ntraining: {train:,.0f} tokens/s (given)")
    name, packing, slowest = min(results, key=lambda r: r[2])
    ratio = slowest / train
    verdict = "OK" if ratio >= TARGET else f"below the {TARGET:g}x target"
    print(
        f"ratio: slowest pipeline ({name}, {packing}) {slowest:,.0f} / training {train:,.0f} "
        f"tokens/s = {ratio:,.1f}x (target >= {TARGET:g}x): {verdict}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "batch_size": args.batch_size,
                    "block_size": args.block_size,
                    "bpe_vocab": args.bpe_vocab,
                    "train_tokens_per_sec": train,
                    "ratio": ratio,
                    "rows": [
                        {"tokenizer": t, "packing": p, "tokens_per_sec": r} for t, p, r in results
                    ],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
