"""Our AdamW: torch.optim.AdamW's numbers when clipping is off, no Python scalars that change."""

from __future__ import annotations

import pytest
import torch

from optimizers.adamw import AdamW


def train(opt_cls, steps=20, lr=1e-2, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = opt_cls(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, **kwargs)
    data = torch.randn(steps, 32, 8, generator=torch.Generator().manual_seed(1))
    for x in data:
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_matches_torch_adamw_over_20_steps():
    ours, _ = train(AdamW)
    ref, _ = train(torch.optim.AdamW)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_tensor_learning_rate_gives_the_same_result():
    ours, _ = train(AdamW, lr=torch.tensor(1e-2))
    ref, _ = train(torch.optim.AdamW)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_step_count_is_a_tensor_in_the_state():
    _, opt = train(AdamW, steps=3)
    state = next(iter(opt.state.values()))
    assert isinstance(state["step"], torch.Tensor) and state["step"].item() == 3


def test_update_clip_bounds_every_element_of_the_update():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdamW([p], lr=1.0, weight_decay=0.0, update_clip=0.5)
    p.grad = torch.tensor([1.0, -1.0, 1e-3, 0.0])
    opt.step()
    # Adam's first update is ±1 wherever the gradient is non-zero: clamped to ±0.5.
    torch.testing.assert_close(p.detach(), torch.tensor([-0.5, 0.5, -0.5, 0.0]))


def test_update_rms_clip_scales_the_whole_tensor():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdamW([p], lr=1.0, weight_decay=0.0, update_rms_clip=0.25)
    p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0])  # first update: all ±1, RMS 1
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.25, 0.25, -0.25, 0.25]))


def test_bfloat16_state():
    _, opt = train(AdamW, steps=2, state_dtype=torch.bfloat16)
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16


def test_rejects_non_positive_clips():
    with pytest.raises(ValueError, match="update_clip"):
        AdamW([torch.nn.Parameter(torch.zeros(1))], update_clip=0.0)


def test_a_non_finite_step_is_skipped_on_the_device_and_counted():
    model, opt = train(AdamW, steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step(skip=torch.tensor(True))
    opt.step(skip=torch.tensor(True))
    for p, b, s in zip(model.parameters(), before, state_before):
        assert torch.equal(p.detach(), b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], s[key]), key
    assert opt.skipped_steps.item() == 2 and opt.consecutive_skips.item() == 2
    # A finite step goes through, as if the skipped ones never happened.
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step(skip=torch.tensor(False))
    assert opt.state[next(model.parameters())]["step"].item() == 4
    assert opt.skipped_steps.item() == 2 and opt.consecutive_skips.item() == 0


def test_skip_false_computes_what_torch_adamw_computes():
    class Flagged(AdamW):
        def step(self, closure=None):
            return super().step(closure, skip=torch.tensor(False))

    ours, _ = train(Flagged)
    ref, _ = train(torch.optim.AdamW)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_update_clip_fraction_counts_clamped_elements():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdamW([p], lr=1.0, weight_decay=0.0, update_clip=0.5)
    p.grad = torch.tensor([1.0, -1.0, 1e-3, 0.0])  # updates ±1, ±1, ~1, 0: three clamped
    opt.step()
    assert opt.update_clip_fraction.item() == pytest.approx(0.75)


def test_update_clip_fraction_counts_rms_scaled_tensors():
    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    opt = AdamW([big, small], lr=1.0, weight_decay=0.0, update_rms_clip=0.5)
    big.grad = torch.ones(4)  # update RMS 1: scaled
    small.grad = torch.tensor([1.0, 0.0, 0.0, 0.0])  # update RMS 0.5: left alone
    opt.step()
    assert opt.update_clip_fraction.item() == pytest.approx(0.5)
    assert AdamW([torch.nn.Parameter(torch.zeros(1))]).update_clip_fraction is None


def test_init_state_creates_what_the_first_step_would():
    model = torch.nn.Linear(3, 2)
    opt = AdamW(model.parameters(), state_dtype=torch.bfloat16)
    opt.init_state()
    state = opt.state[model.weight]
    assert state["exp_avg"].shape == (2, 3) and state["exp_avg"].dtype == torch.bfloat16
    assert state["step"].item() == 0 and not state["exp_avg_sq"].any()


def TracedPath(params, **kwargs):
    """The out-of-place update XLA traces, run on the CPU."""
    return AdamW(params, traced=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"update_clip": 0.5},
        {"update_rms_clip": 0.5},
        {"state_dtype": torch.bfloat16},
    ],
)
def test_the_in_place_update_of_eager_devices_matches_the_traced_one(kwargs):
    in_place, opt = train(AdamW, **kwargs)
    traced, ref_opt = train(TracedPath, **kwargs)
    for a, b in zip(in_place.parameters(), traced.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if "update_clip" in kwargs or "update_rms_clip" in kwargs:
        assert opt.update_clip_fraction.item() == ref_opt.update_clip_fraction.item()
