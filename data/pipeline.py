"""The host's batch stream: source → tokenizer → packing → collator, epoch after epoch."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from collators import get_collator
from data.config import DataConfig
from data.packing import check_packing, pack_concat
from data.sources import host_texts, open_stream
from data.tokenizers import Tokenizer
from torchprime.errors import ConfigError

log = logging.getLogger(__name__)


class TextBatches:
    """Batches of `batch_size` rows for this host, without end: a finished pass over the
    source starts the next epoch."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        check_packing(cfg.packing)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.collate = get_collator(cfg.collator)
        self.epoch = 0
        open_stream(cfg)  # fail now, naming the path, rather than at the first batch

    def _rows(self) -> Iterator[list[int]]:
        while True:
            docs = (
                self.tokenizer.encode(text)
                for text in host_texts(self.cfg, self.process_index, self.process_count)
            )
            produced = 0
            for row in pack_concat(docs, self.cfg.block_size, self.tokenizer.eos_id):
                produced += 1
                yield row
            if not produced:
                raise ConfigError(
                    f"data: the source ({self.cfg.source} {self.cfg.path or ''}) gives host "
                    f"{self.process_index} less than one row of data.block_size="
                    f"{self.cfg.block_size} tokens."
                )
            self.epoch += 1
            log.info("data: epoch %d done after %d rows; starting again", self.epoch, produced)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows = self._rows()
        while True:
            yield self.collate([next(rows) for _ in range(self.batch_size)])
