"""The evaluation batches: cut once at start-up from the held-out data, the same rows every
evaluation, so the held-out curve compares like with like."""

from __future__ import annotations

import dataclasses

import torch

from data.config import DataConfig
from data.holdout import Holdout
from data.pipeline import TextBatches
from data.tokenizers import Tokenizer
from torchprime.errors import ConfigError
from trainers.eval_config import EvalConfig

#: Evaluation reads its sources in order, the same whatever the run's seed.
EVAL_SEED = 0

SOURCE_KEYS = ("source", "path", "format", "hub_config", "split", "text_field", "sources")


def training_holdout(cfg: EvalConfig) -> Holdout | None:
    """What the training stream leaves out: the held-out share, unless eval.data is given."""
    if cfg.holdout is None or cfg.data.given:
        return None
    return Holdout(cfg.holdout, held_out=False)


def eval_data_config(cfg: EvalConfig, data: DataConfig) -> tuple[DataConfig, Holdout | None, str]:
    """(data config, holdout side, config key) of the evaluation stream: eval.data's sources,
    or the training sources' held-out share; the training data's tokenizer, block size,
    packing and collator; no shuffling, one stream (one logical shard)."""
    if cfg.data.given:
        sources = {k: getattr(cfg.data, k) for k in SOURCE_KEYS}
        if not cfg.data.source:
            sources["source"] = data.source  # a mixture: `sources` is read
        return (
            dataclasses.replace(data, **sources, shuffle_buffer=0, logical_shards=1),
            None,
            "eval.data",
        )
    assert cfg.holdout is not None
    one_stream = dataclasses.replace(data, shuffle_buffer=0, logical_shards=1)
    return one_stream, Holdout(cfg.holdout, True), "eval.holdout"


def cut_eval_batches(
    cfg: EvalConfig,
    data: DataConfig,
    tokenizer: Tokenizer,
    rows: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """`cfg.steps` batches of `rows` rows (this host's part of an evaluation batch), read once
    through the held-out data from its start; a ConfigError when it holds fewer.

    Every host reads the same held-out stream, the whole source rather than its own part, and
    keeps its rows of each batch: the evaluation batches are the same whatever the host count
    (a host's own part of a small held-out share could hold no document at all)."""
    eval_cfg, holdout, key = eval_data_config(cfg, data)
    stream = TextBatches(eval_cfg, tokenizer, rows * process_count, 0, 1, EVAL_SEED, holdout, key)
    batches: list[dict[str, torch.Tensor]] = []
    mine = slice(process_index * rows, (process_index + 1) * rows)
    try:
        for _ in range(cfg.steps):
            batch = next(stream)
            if any(r.epoch for r in stream.readers):  # a source ran out: this batch wraps
                break
            batches.append({k: v[mine].clone() for k, v in batch.items()})
    except ConfigError as e:  # less than one row in the held-out data
        raise ConfigError(f"eval.steps={cfg.steps}: {e}") from None
    finally:
        stream.close()
    if len(batches) < cfg.steps:
        raise ConfigError(
            f"eval.steps={cfg.steps} is more than the held-out data ({key}) can fill: it holds "
            f"{len(batches)} batches of {rows * process_count} rows of data.block_size="
            f"{data.block_size} tokens. Lower eval.steps or eval.batch_size, or give more "
            "held-out data."
        )
    return batches
