"""Attention: segment ids and biases that keep packed documents apart, and the TPU kernels'
start-up checks."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import requires_xla
from models import build_model
from models.llama import LlamaConfig
from models.masks import padding_bias, segment_bias
from torchprime.attention import block_sizes, check_attention_kernel, padded_length
from torchprime.errors import ConfigError
from trainers.lm_trainer import model_inputs


def make(**overrides):
    model = build_model(LlamaConfig(**overrides), torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_a_segment_bias_makes_packed_documents_independent(kernel):
    model = make(attention_kernel=kernel)
    g = torch.Generator().manual_seed(2)
    doc_a, doc_b = (
        torch.randint(0, 264, (1, 7), generator=g),
        torch.randint(0, 264, (1, 9), generator=g),
    )
    packed = torch.cat([doc_a, doc_b], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 9])
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]  # restart per document
    out = model(packed, position_ids=positions, attention_bias=segment_bias(segments)).logits
    torch.testing.assert_close(out[:, :7], model(doc_a).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 7:], model(doc_b).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_padding_bias_hides_padding_even_without_causality(kernel):
    model = make(attention_kernel=kernel, is_causal=False)
    ids = torch.randint(0, 264, (1, 10), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 10 + [0] * 6])
    out = model(padded, attention_bias=padding_bias(mask)).logits
    torch.testing.assert_close(out[:, :10], model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_fully_blocked_row_gives_numbers_not_nan():
    model = make(attention_kernel="eager")
    ids = torch.randint(0, 264, (1, 8))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])  # left padding: row 0 sees nothing real
    assert torch.isfinite(model(ids, attention_bias=padding_bias(mask)).logits).all()


def check(kernel="flash", overrides=None, kind="TPU v5p", causal=True, seq=2048, bias=False):
    check_attention_kernel(kernel, overrides or {}, kind, causal, seq, bias)


def test_pallas_kernels_refuse_to_start_off_tpu():
    for kernel in ("flash", "splash"):
        with pytest.raises(
            ConfigError,
            match=f"attention_kernel='{kernel}' is a Pallas kernel "
            "that runs only on TPU; this run's devices are CPU",
        ):
            check(kernel, kind="CPU")
    check("sdpa", kind="CPU")


def test_block_sizes_are_checked_by_name_and_granularity():
    check(overrides={"block_q": 1024, "block_k_major": 1024})
    with pytest.raises(ConfigError, match="block_qq not known to flash; it takes block_q"):
        check(overrides={"block_qq": 512})
    with pytest.raises(ConfigError, match="block_k=100: must be a positive multiple of 128"):
        check(overrides={"block_k": 100})
    with pytest.raises(ConfigError, match="takes no block sizes"):
        check("sdpa", overrides={"block_q": 512}, kind="CPU")


def packed_rows(T=48):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 264, (2, T), generator=g)
    segments = torch.tensor([[1] * 11 + [2] * 20 + [3] * (T - 31), [1] * 30 + [2] * (T - 30)])
    starts = torch.cat([torch.ones(2, 1, dtype=torch.bool), segments[:, 1:] != segments[:, :-1]], 1)
    positions = torch.stack(
        [
            torch.cat(
                [torch.arange(n) for n in row.unique_consecutive(return_counts=True)[1].tolist()]
            )
            for row in segments
        ]
    )
    assert starts.sum() == 5
    return ids, segments, positions


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
def test_segment_ids_give_the_logits_and_gradients_of_the_dense_segment_bias(kernel, causal):
    model = make(attention_kernel=kernel, is_causal=causal)
    ids, segments, positions = packed_rows()
    labels = ids.clone()

    def run(**mask):
        model.zero_grad()
        out = model(ids, labels=labels, position_ids=positions, **mask)
        out.loss.backward()
        return out.logits, [p.grad.clone() for p in model.parameters()]

    logits, grads = run(segment_ids=segments)
    ref_logits, ref_grads = run(attention_bias=segment_bias(segments))
    assert (logits - ref_logits).abs().max() <= 1e-6
    assert max((g - r).abs().max().item() for g, r in zip(grads, ref_grads)) <= 1e-6


class _Shapes(TorchDispatchMode):
    """Every tensor an op makes: (shape, dtype)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.made.append((tuple(t.shape), t.dtype))
        return out


def test_sdpa_with_segment_ids_never_makes_a_float_mask_per_head_nor_stores_one():
    model = make(attention_kernel="sdpa")
    ids, segments, positions = packed_rows(T=48)
    with _Shapes() as shapes:
        model(ids, position_ids=positions, segment_ids=segments)
    B, H, T = 2, 4, 48
    per_head = [(s, d) for s, d in shapes.made if s == (B, H, T, T)]
    assert per_head == []
    masks = {d for s, d in shapes.made if s == (B, 1, T, T)}
    assert torch.bool in masks  # built in attention, per call, as booleans
    assert [name for name, _ in model.named_buffers()] == ["model.rotary_emb.inv_freq"]


def test_document_batches_reach_the_model_as_segment_ids_not_a_bias():
    ids, segments, positions = packed_rows()
    batch = {"input_ids": ids, "labels": ids, "segment_ids": segments, "position_ids": positions}
    inputs = model_inputs(batch)
    assert set(inputs) == {"input_ids", "labels", "segment_ids", "position_ids"}
    assert inputs["segment_ids"] is segments


@requires_xla
def test_the_pallas_calls_match_torch_xla_signatures():
    from torch_xla.experimental.custom_kernel import flash_attention
    from torch_xla.experimental.splash_attention import splash_attention

    flash = inspect.signature(flash_attention).parameters
    assert {"q_segment_ids", "kv_segment_ids", "ab", "partition_spec", "mesh"} <= set(flash)
    assert "decoder_segment_ids" in inspect.signature(splash_attention).parameters


def test_splash_refuses_an_elementwise_bias():
    with pytest.raises(ConfigError, match="splash takes no elementwise attention bias"):
        check("splash", bias=True)
    check("flash", bias=True)


def test_sequences_are_padded_to_the_blocks():
    sizes = block_sizes("flash", {})
    assert padded_length("flash", sizes, 2048) == 2048
    assert padded_length("flash", sizes, 1000) == 1024  # multiple of the 512 blocks
    assert padded_length("flash", sizes, 200) == 256  # shorter than a block: lanes of 128
    with pytest.raises(ConfigError, match="1000 would be padded to 1024"):
        check(causal=False, seq=1000)  # bidirectional attention would see the padding
