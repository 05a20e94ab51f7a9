"""Language-model pretraining: the loss is the model's next-token cross-entropy."""

from __future__ import annotations

from pathlib import Path

import torch

from models.llama import IGNORE_INDEX
from models.masks import segment_bias
from trainers.base_trainer import BaseTrainer
from trainers.hosts import is_coordinator


class LMTrainer(BaseTrainer):
    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        extra = {}
        if "position_ids" in batch:  # document packing: RoPE positions restart per document
            extra["position_ids"] = batch["position_ids"]
        if "segment_ids" in batch:  # document packing: attention stays within each document
            dtype = next(self.model.parameters()).dtype
            extra["attention_bias"] = segment_bias(batch["segment_ids"], dtype)
        out = self.model(input_ids=batch["input_ids"], labels=labels, **extra)
        # The loss is a mean over the labelled next tokens (position t predicts t + 1): their
        # count weights this batch when micro-batches are accumulated into one step.
        num_tokens = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        return out.loss, {"num_tokens": num_tokens}

    def export_hf(self, path: Path) -> None:
        from models.hf import save_hf

        save_hf(self.model, path, to_host=self.backend.host_copy, write=is_coordinator())
