"""`python tests/e2e/train_with_poison.py STEP FACTOR [overrides...]`: train.py whose loss at
step STEP is multiplied by FACTOR (a bad batch; `nan` makes its gradients non-finite). The
factor is a device tensor copied in before each step, so on XLA every step runs the same graph.
The poison comes from a trainer subclass registered for this process only, not from a hook
inside the trainer."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import trainers  # noqa: E402
from run.launch import launch  # noqa: E402
from train_config import register_schema  # noqa: E402
from trainers.lm_trainer import LMTrainer  # noqa: E402

STEP = int(sys.argv.pop(1))
FACTOR = float(sys.argv.pop(1))


class PoisonedLM(LMTrainer):
    def forward(self, batch):
        loss, aux = super().forward(batch)
        # Times 2 then times 0.5: exact, and the tensor never holds 1.0, which torch_xla
        # would bake into the graph as a constant (a recompilation at the poisoned step).
        return loss * self.loss_factor * 0.5, aux

    def _run_step(self, step, batches):
        if not hasattr(self, "loss_factor"):
            self.loss_factor = torch.ones((), device=self.backend.device)
        self.loss_factor.copy_(torch.tensor(2 * FACTOR if step == STEP else 2.0))
        return super()._run_step(step, batches)


trainers.TRAINERS["lm"] = PoisonedLM
register_schema()


@hydra.main(config_path=str(ROOT / "configs"), config_name="default", version_base=None)
def main(raw: DictConfig) -> None:
    sys.exit(launch(raw))


if __name__ == "__main__":
    main()
