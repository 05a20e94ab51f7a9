"""Language-model pretraining: the loss is the model's next-token cross-entropy."""

from __future__ import annotations

from pathlib import Path

import torch

from models.llama import IGNORE_INDEX
from torchprime.context import context_size, load_balance_order
from trainers.base_trainer import BaseTrainer
from trainers.hosts import is_coordinator


class LMTrainer(BaseTrainer):
    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        load_balance = getattr(getattr(self.model, "config", None), "load_balance_context", False)
        inputs = model_inputs(batch, context_size(self.mesh), load_balance)
        out = self.model(**inputs)
        # The loss is a mean over the labelled next tokens (position t predicts t + 1): their
        # count weights this batch when micro-batches are accumulated into one step.
        num_tokens = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        # The model's own scalars (a mixture of experts: aux_loss, dropped_fraction, expert
        # load) are logged with the step, read in the same step closure as the loss.
        return out.loss, {"num_tokens": num_tokens, **getattr(out, "metrics", {})}

    def export_hf(self, path: Path) -> None:
        from models.hf import save_hf

        save_hf(self.model, path, to_host=self.backend.host_copy, write=is_coordinator())


def model_inputs(
    batch: dict[str, torch.Tensor], context: int = 1, load_balance: bool = False
) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a collated batch (collators/causal_lm.py).

    Document packing brings `position_ids` (RoPE restarts per document) and `segment_ids`
    (attention stays within each document). With the sequence split over `context` > 1
    devices, the labels are shifted here into per-position `targets` (the model would
    otherwise cut the last position, leaving T - 1 tokens that do not split evenly); with
    `load_balance` every [B, T] tensor is reordered (torchprime.context.load_balance_order)
    and the model is told each token's original place (`token_index`) for the causal order.
    """
    extra = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}
    if context == 1:
        return {"input_ids": batch["input_ids"], "labels": batch["labels"], **extra}
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    inputs = {"input_ids": batch["input_ids"], "targets": targets, **extra}
    if not load_balance:
        return inputs
    ids = batch["input_ids"]
    order = load_balance_order(ids.shape[1], context).to(ids.device)
    if "position_ids" not in inputs:
        inputs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    inputs = {k: v.index_select(1, order) for k, v in inputs.items()}
    inputs["token_index"] = order
    return inputs
