"""Learning-rate schedules computed from the step tensor."""

from __future__ import annotations

import pytest
import torch

from optimizers.schedules import lr_multiplier
from torchprime.errors import ConfigError


def curve(name, warmup=10, max_steps=110, min_ratio=0.1):
    return [
        lr_multiplier(torch.tensor(s), name, warmup, max_steps, min_ratio).item()
        for s in range(max_steps + 1)
    ]


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


def test_wsd_holds_the_peak_then_decays_linearly_over_decay_steps():
    c = [
        lr_multiplier(torch.tensor(s), "wsd", 10, 110, 0.1, decay_steps=20).item()
        for s in range(111)
    ]
    assert c[4] == pytest.approx(0.5)  # the same warmup as the others
    assert c[10] == c[50] == c[90] == 1.0  # stable until max_steps - decay_steps
    assert c[100] == pytest.approx(0.55)  # half way down the decay
    assert c[110] == pytest.approx(0.1)


def test_wsd_decay_fraction_is_a_share_of_max_steps():
    by_fraction = [
        lr_multiplier(torch.tensor(s), "wsd", 0, 200, 0.0, decay_fraction=0.25).item()
        for s in (149, 150, 175, 200)
    ]
    assert by_fraction == pytest.approx([1.0, 1.0, 0.5, 0.0])
    # neither given: the last 10%
    default = [lr_multiplier(torch.tensor(s), "wsd", 0, 200, 0.0).item() for s in (180, 190)]
    assert default == pytest.approx([1.0, 0.5])


def test_wsd_rejects_both_lengths_and_a_decay_longer_than_the_run():
    with pytest.raises(ConfigError, match="decay_steps=5 and .*decay_fraction=0.5: give one"):
        lr_multiplier(torch.tensor(0), "wsd", 0, 10, 0.0, decay_steps=5, decay_fraction=0.5)
    with pytest.raises(ConfigError, match=r"decay_steps=95: must be between 1 and .* = 100 - 10"):
        lr_multiplier(torch.tensor(0), "wsd", 10, 100, 0.0, decay_steps=95)
