"""Learning-rate schedules computed from the step tensor."""

from __future__ import annotations

import pytest
import torch

from optimizers.schedules import lr_multiplier
from torchprime.errors import ConfigError


def curve(name, warmup=10, max_steps=110, min_ratio=0.1):
    return [lr_multiplier(torch.tensor(s), name, warmup, max_steps, min_ratio).item()
            for s in range(max_steps + 1)]


def test_warmup_is_linear_from_the_first_step():
    c = curve("constant")
    assert c[0] == pytest.approx(0.1) and c[4] == pytest.approx(0.5) and c[9] == 1.0
    assert c[50] == 1.0


def test_cosine_decays_to_the_floor_at_max_steps():
    c = curve("cosine")
    assert c[10] == pytest.approx(1.0)
    assert c[60] == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert c[110] == pytest.approx(0.1)


def test_linear_decays_to_the_floor_at_max_steps():
    c = curve("linear")
    assert c[60] == pytest.approx(0.55) and c[110] == pytest.approx(0.1)


def test_unknown_schedule_names_the_key():
    with pytest.raises(ConfigError, match="trainer.lr_scheduler.name='cosin'"):
        lr_multiplier(torch.tensor(0), "cosin", 0, 10, 0.0)
