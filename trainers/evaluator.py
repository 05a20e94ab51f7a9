"""Held-out evaluation: the loss of the model on the same evaluation batches each time.

The batches are cut once at start-up (data/eval_batches.py) and placed on the devices once,
laid out like training batches. Each batch is one forward-only graph (no gradients, no
optimizer), the same graph for every batch and every evaluation, so XLA compiles it once. The
result is the token-weighted mean loss over the real tokens (labels not ignored: no padding,
no first token of a packed document) of every batch, summed on the host in float64: it does
not depend on how the rows are split over batches, devices or processes.

Evaluation reads nothing of training's: not its batches, not an RNG; it switches the model to
eval mode and back. Training after an evaluation is the training without it.

With `eval.samples`, each evaluation also continues those prompts greedily, on a host copy of
the model with a KV cache (models/generation.py): decoding token by token has no place in the
device's compiled graphs, and a copy works the same on every backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.tokenizers import Tokenizer
from models import build_model
from models.generation import generate
from torchprime.backend.base import Backend
from torchprime.mesh import Mesh
from torchprime.sharding import BATCH_SPEC
from trainers.eval_config import EvalConfig

#: (loss, aux) of a batch, as the trainer's `forward`; aux["num_tokens"] weights the loss.
Forward = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class EvalResult:
    step: int
    """The training step the model had taken (a checkpoint's step in eval_only runs)."""
    loss: float
    """Mean cross-entropy per real token over every evaluation batch."""
    tokens: int
    """The real tokens it is a mean over."""
    samples: list[dict[str, str]] | None = None
    """{"prompt", "text"} of each of eval.samples: the greedy continuation (eval_samples)."""

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl / wandb fields."""
        record = {"eval_loss": self.loss, "eval_ppl": self.ppl, "eval_tokens": self.tokens}
        if self.samples is not None:
            record["eval_samples"] = self.samples
        return record


class Evaluator:
    def __init__(
        self,
        cfg: EvalConfig,
        batches: list[dict[str, torch.Tensor]],
        backend: Backend,
        mesh: Mesh,
        tokenizer: Tokenizer | None = None,
        add_bos: bool = False,
    ):
        """`tokenizer`, `add_bos`: how eval.samples prompts are encoded (the training data's)."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.backend = backend
        self.mesh = mesh
        self._host_batches = batches
        self._device_batches: list[dict[str, torch.Tensor]] | None = None
        self.results: list[EvalResult] = []

    def due(self, step: int, max_steps: int) -> bool:
        """Whether training evaluates after `step`."""
        every = self.cfg.interval
        return bool(every and step % every == 0) or (self.cfg.at_end and step == max_steps)

    def _batches(self) -> list[dict[str, torch.Tensor]]:
        # Placed once, with the training batches' layout; kept on the devices (a few rows).
        if self._device_batches is None:
            loader = self.backend.device_loader(self._host_batches, self.mesh, BATCH_SPEC)
            self._device_batches = list(loader)
        return self._device_batches

    def evaluate(self, model: nn.Module, forward: Forward, step: int) -> EvalResult:
        """The held-out loss of `model` now; the model's mode is left as it was."""
        was_training = model.training
        model.eval()
        sums = []
        try:
            with torch.no_grad():
                for batch in self._batches():
                    loss, aux = forward(batch)
                    count = aux.get("num_tokens")
                    count = torch.ones_like(loss) if count is None else count.to(torch.float32)
                    pair = torch.stack([loss.detach().float() * count, count])
                    sums.append(self.backend.sum_over_data(pair))
                    self.backend.sync()  # one graph a batch: the same graph for every batch
        finally:
            model.train(was_training)
        total = torch.stack([s.cpu().double() for s in sums]).sum(0)
        loss_sum, tokens = float(total[0]), float(total[1])
        samples = self.sample(model) if self.cfg.samples else None
        result = EvalResult(step, loss_sum / max(tokens, 1.0), round(tokens), samples)
        self.results.append(result)
        return result

    def sample(self, model: nn.Module) -> list[dict[str, str]]:
        """The greedy continuation of each of eval.samples (every process takes part: copying
        a model split over processes gathers it)."""
        assert self.tokenizer is not None, "eval.samples needs the tokenizer"
        tok, copy = self.tokenizer, host_model(model, self.backend)
        found = []
        for prompt in self.cfg.samples:
            ids = ([tok.bos_id] if self.add_bos else []) + tok.encode(prompt)
            new = generate(copy, ids, self.cfg.sample_tokens, eos_id=tok.eos_id)
            found.append(
                {"prompt": prompt, "text": tok.decode([t for t in new if t != tok.eos_id])}
            )
        return found

    @property
    def best(self) -> EvalResult | None:
        return min(self.results, key=lambda r: r.loss) if self.results else None

    @property
    def last(self) -> EvalResult | None:
        return self.results[-1] if self.results else None


def host_model(model: nn.Module, backend: Backend) -> nn.Module:
    """A copy of `model` in host memory, in eval mode, gathered one tensor at a time."""
    dtype = next(model.parameters()).dtype
    copy = build_model(model.config, dtype).to_empty(device="cpu")
    copy.tie_weights()  # to_empty unties them
    sources = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, tensor in [*copy.named_parameters(), *copy.named_buffers()]:
            tensor.copy_(backend.host_copy(sources[name]))
    return copy.eval()


def write_eval_json(path: Path, result: EvalResult, source: str, extra: dict[str, Any]) -> None:
    """eval_only's result file: the figures, what was evaluated and on what."""
    record = {"step": result.step, **result.record(), "model": source, **extra}
    path.write_text(json.dumps(record, indent=2) + "\n")
