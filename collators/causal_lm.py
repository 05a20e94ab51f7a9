"""Next-token prediction on packed rows: every token is an input, and a label unless it is
padding or the first token of a packed document."""

from __future__ import annotations

import torch

from models.llama import IGNORE_INDEX


def collate_causal_lm(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Rows of one packing (data/packing.py) → int64 [batch, block_size] tensors.

    Labels are aligned with the inputs (the model's loss shifts them: the label at t is
    predicted from position t - 1), and IGNORE_INDEX where there is nothing to learn:
      concat    input_ids, labels (= inputs; the EOS between documents is learned)
      document  input_ids, labels, position_ids, segment_ids. labels[t] is ignored where a
                new segment starts (segment_ids[t] != segment_ids[t-1]): a document's first
                token is never predicted from the previous document. segment_ids are for the
                attention bias (models.masks.segment_bias), position_ids for RoPE.
      pad       input_ids, labels (ignored on padding)
    The keys depend only on the packing, so every batch of a run has the same ones.
    """
    input_ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    labels = input_ids.clone()
    batch = {"input_ids": input_ids}
    if "attention_mask" in rows[0]:
        mask = torch.tensor([r["attention_mask"] for r in rows], dtype=torch.long)
        labels[mask == 0] = IGNORE_INDEX
    if "segment_ids" in rows[0]:
        segments = torch.tensor([r["segment_ids"] for r in rows], dtype=torch.long)
        labels[:, 1:][segments[:, 1:] != segments[:, :-1]] = IGNORE_INDEX
        batch["position_ids"] = torch.tensor([r["position_ids"] for r in rows], dtype=torch.long)
        batch["segment_ids"] = segments
    batch["labels"] = labels
    return batch
