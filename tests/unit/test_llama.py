"""The Llama model: shapes, attention kernels agree, causality, seeded init, the loss."""

from __future__ import annotations

import math

import pytest
import torch

from models import build_model
from models.llama import IGNORE_INDEX, LlamaConfig, RopeScalingConfig, causal_lm_loss


def make(seed: int = 0, **overrides) -> torch.nn.Module:
    model = build_model(LlamaConfig(**overrides), torch.float32)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def tokens(batch=2, length=16, vocab=264, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_parameter_count():
    model = make()
    out = model(tokens())
    assert out.logits.shape == (2, 16, 264) and out.loss is None
    # embed + head + 4 x (q, k, v, o, gate, up, down, 2 norms) + final norm
    per_layer = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 384 + 2 * 128
    assert sum(p.numel() for p in model.parameters()) == 2 * 264 * 128 + 4 * per_layer + 128


def test_eager_and_sdpa_attention_agree():
    ids = tokens()
    eager = make(attention_kernel="eager")(ids).logits
    sdpa = make(attention_kernel="sdpa")(ids).logits
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_causal_attention_ignores_the_future(kernel):
    model = make(attention_kernel=kernel)
    ids = tokens()
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 264
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_bidirectional_attention_sees_the_future():
    model = make(is_causal=False)
    ids = tokens()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 264
    assert not torch.allclose(model(ids).logits[:, 0], model(changed).logits[:, 0])


def test_init_is_seeded_and_follows_the_config():
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" in name:
            assert torch.all(pa == 1), name
        else:
            assert not torch.equal(pa, pc), name
    std = a.model.layers[0].mlp.up_proj.weight.std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    scaled = make(scale_output_init=True).model.layers[0].mlp.down_proj.weight.std().item()
    assert scaled == pytest.approx(0.02 / math.sqrt(8), rel=0.05)


def test_tied_embeddings_share_one_tensor():
    model = make(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (
        sum(p.numel() for p in model.parameters())
        == sum(p.numel() for p in make().parameters()) - 264 * 128
    )


def test_loss_is_the_mean_over_labelled_tokens_only():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    # predictions at t for labels at t + 1: (2, 3, 4, 5) and (7) count, 5 in all
    pairs = [(0, 0, 2), (0, 1, 3), (0, 2, 4), (0, 3, 5), (1, 0, 7)]
    expected = sum(-torch.log_softmax(logits[b, t], -1)[y] for b, t, y in pairs) / 5
    assert causal_lm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_does_not_depend_on_how_the_batch_is_split():
    model = make()
    ids = tokens(batch=4)
    labels = ids.clone()
    labels[0, 8:] = IGNORE_INDEX  # unequal real-token counts per row
    whole = model(ids, labels=labels).loss
    a, b = model(ids[:2], labels=labels[:2]), model(ids[2:], labels=labels[2:])
    count_a = (labels[:2, 1:] != IGNORE_INDEX).sum()
    count_b = (labels[2:, 1:] != IGNORE_INDEX).sum()
    rejoined = (a.loss * count_a + b.loss * count_b) / (count_a + count_b)
    torch.testing.assert_close(whole, rejoined)


def test_llama3_rope_scaling_changes_only_long_wavelengths():
    from models.llama import rope_inv_freq

    plain = rope_inv_freq(LlamaConfig(rope_theta=500000.0))
    scaled = rope_inv_freq(
        LlamaConfig(rope_theta=500000.0, rope_scaling=RopeScalingConfig(factor=8.0))
    )
    assert torch.equal(plain[:4], scaled[:4])  # short wavelengths kept
    torch.testing.assert_close(scaled[-1], plain[-1] / 8)  # the longest slowed by the factor


def test_bfloat16_parameters_keep_float32_rope_frequencies():
    model = build_model(LlamaConfig(), torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_shifting_before_the_head_gives_the_same_loss_with_one_position_less():
    ids = tokens()
    labels = ids.clone()
    labels[1, :5] = IGNORE_INDEX
    shifted = make(shift_before_head=True)(ids, labels=labels)
    full = make(shift_before_head=False)(ids, labels=labels)
    assert shifted.logits.shape == (2, 15, 264) and full.logits.shape == (2, 16, 264)
    torch.testing.assert_close(shifted.loss, full.loss)
    torch.testing.assert_close(shifted.logits, full.logits[:, :-1])


def test_bfloat16_model_trains_close_to_float32():
    ids = tokens()
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(LlamaConfig(), dtype)
        model.to_empty(device="cpu")
        model.init_weights(torch.Generator().manual_seed(0))
        out = model(ids, labels=ids)
        out.loss.backward()
        assert out.loss.dtype == torch.float32  # the loss is computed in float32
        assert all(
            p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in model.parameters()
        )
        losses[dtype] = out.loss.item()
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=2e-2)
