"""Schema of the `eval` block: held-out data, when to evaluate, and sampled text
(trainers/evaluator.py evaluates; data/eval_batches.py cuts the batches)."""

from __future__ import annotations

from dataclasses import dataclass, field

from data.config import FileFormat, SourceConfig, SourceKind, source_problems
from torchprime.errors import Problems

#: eval.holdout larger than this would leave training less than half the corpus.
MAX_HOLDOUT = 0.5


@dataclass
class EvalDataConfig:
    """Held-out text: the source keys of `data` (a source, files, hub, or a weighted
    `sources` mixture). The tokenizer, block size, packing and collator are the training
    data's, so the loss means the same."""

    source: SourceKind | None = None
    """stdlib, files or hub, as `data.source`; null (and no `sources`): no eval.data, the
    held-out share of the training data (eval.holdout) is evaluated instead."""
    path: str | None = None
    """files: a file, a folder or a glob; hub: the dataset name."""
    format: FileFormat = FileFormat.text
    """files: text (one document a file), json (JSON lines) or parquet."""
    hub_config: str | None = None
    """hub: the dataset's configuration name."""
    split: str = "validation"
    """hub: the split to read."""
    text_field: str = "text"
    """Field of each row that holds the text."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture, as `data.sources` (drawn in an order fixed once, whatever the run's
    seed). Empty: the single source above."""

    @property
    def given(self) -> bool:
        return self.source is not None or bool(self.sources)

    def problems(self, key: str = "eval.data") -> Problems:
        found = Problems()
        for i, source in enumerate(self.sources):
            found += source.problems(f"{key}.sources[{i}]")
        if self.source is not None and not self.sources:
            source_problems(found, key, self.source, self.path)
        return found


@dataclass
class EvalConfig:
    """Held-out loss during training (and `eval_only` runs)."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Held-out text from its own sources (eval.data.source=files eval.data.path=...); not
    given: the held-out share of the training sources (`holdout`)."""
    holdout: float | None = None
    """Without eval.data: this fraction of the training sources' documents (0 < f <= 0.5) is
    held out, chosen by a hash of each document's text, so the same documents are held out
    whatever the seed, host count or mesh; training never reads them. null: nothing held out."""
    interval: int | None = None
    """Evaluate every this many steps during training (null: not during training)."""
    steps: int = 8
    """Batches per evaluation: the same batches every time, cut once at start-up."""
    batch_size: int | None = None
    """Rows of one evaluation batch over all hosts and devices (a multiple of the
    data-parallel devices); null: a training micro-batch's rows
    (trainer.global_batch_size / trainer.grad_accum_steps)."""
    at_end: bool = True
    """Evaluate after the last training step too (when there is held-out data)."""
    samples: list[str] = field(default_factory=list)
    """Prompts sampled greedily at each evaluation (eager backends), logged as text to
    metrics.jsonl (`samples`) and wandb. Empty: none."""
    sample_tokens: int = 64
    """Tokens generated for each of `samples`."""

    @property
    def has_data(self) -> bool:
        return self.data.given or self.holdout is not None

    def problems(self, key: str = "eval") -> Problems:
        found = Problems()
        if self.holdout is not None:
            found.check(
                0 < self.holdout <= MAX_HOLDOUT,
                f"{key}.holdout={self.holdout}: must be in (0, {MAX_HOLDOUT}] (null: none).",
            )
        found += self.data.problems(f"{key}.data")
        found.check(
            self.interval is None or self.interval >= 1,
            f"{key}.interval={self.interval}: must be at least 1 (or null: no evaluation "
            "during training).",
        )
        found.check(self.steps >= 1, f"{key}.steps={self.steps}: must be at least 1.")
        found.check(
            self.batch_size is None or self.batch_size >= 1,
            f"{key}.batch_size={self.batch_size}: must be at least 1 (or null).",
        )
        found.check(
            self.sample_tokens >= 1,
            f"{key}.sample_tokens={self.sample_tokens}: must be at least 1.",
        )
        found.check(
            self.interval is None or self.has_data,
            f"{key}.interval={self.interval}: there is no held-out data to evaluate on; set "
            f"{key}.holdout (a share of the training data) or {key}.data.",
        )
        return found
