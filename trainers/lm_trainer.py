"""Language-model pretraining: the loss is the model's next-token cross-entropy."""

from __future__ import annotations

import torch

from trainers.base_trainer import BaseTrainer


class LMTrainer(BaseTrainer):
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model(input_ids=batch["input_ids"], labels=batch["labels"])
        return out.loss, {}
