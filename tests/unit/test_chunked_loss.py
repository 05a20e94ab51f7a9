"""The loss computed in chunks of positions (model.loss_chunk_size) is the whole-sequence loss:
the same value and gradients, on eager and on XLA (fsdp, and tensor parallelism on the
vocabulary), with ignored labels, packed documents and a chunk that leaves a remainder."""

from __future__ import annotations

import pytest
import torch

from collators.causal_lm import collate_causal_lm
from conftest import ROOT, composed, requires_xla
from models import build_model
from models.chunked_loss import chunk_bounds
from models.llama import IGNORE_INDEX, LlamaConfig
from models.memory import estimate_activations
from torchprime.backend import select_backend
from torchprime.materialize import materialize
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.rewriting import RematConfig, apply_rewriting
from torchprime.sharding import ShardingConfig, plan_parameter_specs

FSDP_TP = {
    "model.embed_tokens.weight": ["fsdp", "tensor"],
    "model.layers.*.self_attn.q_proj.weight": ["tensor", "fsdp"],
    "model.layers.*.mlp.up_proj.weight": ["tensor", "fsdp"],
    "lm_head.weight": ["tensor", "fsdp"],  # the vocabulary split over `tensor`
}
FSDP = {"model.embed_tokens.weight": ["fsdp", None], "lm_head.weight": ["fsdp", None]}


def test_chunks_cover_the_positions_and_the_last_holds_the_remainder():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(3, 8) == [(0, 3)]


def batch(rows=4, length=23, seed=1):
    """Ids with ignored labels in places, and packed documents (positions and segments)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 264, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, 3:9] = IGNORE_INDEX
    labels[1, :] = IGNORE_INDEX  # a row without any label
    segments = (torch.arange(length) >= length // 2).long().expand(rows, length)
    positions = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)])
    return ids, labels, positions.expand(rows, length), segments


def loss_and_grads(backend, mesh, parameters, seed=0, **model):
    from models.masks import segment_bias

    cfg = LlamaConfig(num_hidden_layers=2, sharding=ShardingConfig(parameters=parameters), **model)
    net = build_model(cfg, torch.float32)
    specs = plan_parameter_specs(net, cfg.sharding, mesh)
    materialize(
        net, specs, mesh, backend, net.init_module_weights, torch.Generator().manual_seed(seed)
    )
    apply_rewriting(net, RematConfig(), backend)
    ids, labels, positions, segments = (t.to(backend.device) for t in batch())
    bias = segment_bias(segments, torch.float32)
    loss = net(ids, labels=labels, position_ids=positions, attention_bias=bias).loss
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    text = backend.graph_text([loss, *grads.values()])
    backend.sync()
    return loss.detach().cpu(), {n: g.cpu() for n, g in grads.items()}, text


def assert_same(a, b, tol):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("shift_before_head", [True, False])
@pytest.mark.parametrize("tie", [False, True])
def test_eager_chunked_loss_equals_the_whole(shift_before_head, tie):
    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    kw = dict(shift_before_head=shift_before_head, tie_word_embeddings=tie)
    whole = loss_and_grads(backend, mesh, {}, **kw)
    for chunk in (5, 11, 22, 64):  # remainders 2, 0 (of 22 positions), none, one short chunk
        assert_same(loss_and_grads(backend, mesh, {}, loss_chunk_size=chunk, **kw), whole, 1e-6)


def test_eager_chunked_output_has_no_logits_and_a_finite_loss_without_labels_in_a_row():
    model = build_model(LlamaConfig(loss_chunk_size=4), torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    ids, labels, _, _ = batch()
    out = model(ids, labels=labels)
    assert out.logits is None and torch.isfinite(out.loss)
    assert model(ids).logits.shape == (4, 23, 264)  # without labels: logits, as before


@requires_xla
def test_xla_chunked_loss_equals_the_whole_with_fsdp_and_vocab_tensor_parallelism():
    backend = select_backend("xla", cpu_devices=4)
    for axes, parameters in ((dict(fsdp=4), FSDP), (dict(fsdp=2, tensor=2), FSDP_TP)):
        mesh = resolve_mesh(MeshAxesConfig(**axes), MeshAxesConfig(), 4)
        whole = loss_and_grads(backend, mesh, parameters)
        chunked = loss_and_grads(backend, mesh, parameters, loss_chunk_size=5)
        assert_same(chunked, whole, 1e-6)
        # 22 positions in chunks of 5: the [rows, 22, vocab] logits never exist, chunks of 5
        # and the remainder of 2 do, kept apart by barriers
        assert "f32[4,22,264]" in whole[2] and "f32[4,22,264]" not in chunked[2]
        assert "f32[4,5,264]" in chunked[2] and "f32[4,2,264]" in chunked[2]
        assert "opt-barrier" in chunked[2]


def test_activation_estimate_counts_one_chunk_of_logits():
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, num_hidden_layers=2)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), None)

    def logits_bytes(chunk):
        m = LlamaConfig(**{**vars(cfg), "loss_chunk_size": chunk})
        a = estimate_activations(m, RematConfig(), mesh, 4, 8192, 2, "LlamaDecoderLayer")
        return a.logits_bytes

    assert logits_bytes(None) == 4 * 8192 * 128256 * (2 + 4)
    assert logits_bytes(1024) == 4 * 1024 * 128256 * (2 + 4)
    assert logits_bytes(16384) == logits_bytes(None)  # one chunk is the whole sequence


def test_a_chunk_size_below_one_is_refused_at_start_up_naming_the_key():
    cfg = composed("model.loss_chunk_size=0")
    assert any("model.loss_chunk_size=0" in p for p in cfg.problems())


def test_the_8b_pod_preset_chunks_its_loss():
    cfg = composed("+config=llama3_8b_v5p_128")
    assert cfg.model.loss_chunk_size is not None
    assert (ROOT / "configs/config/llama3_8b_v5p_128.yaml").exists()


def test_packed_collated_batch_trains_the_same_in_chunks():
    """Document packing through the collator: ignored first tokens of documents."""
    rows = [
        {
            "input_ids": list(range(1, 17)),
            "segment_ids": [0] * 7 + [1] * 9,
            "position_ids": list(range(7)) + list(range(9)),
        }
        for _ in range(2)
    ]
    b = collate_causal_lm(rows)
    assert (b["labels"] == IGNORE_INDEX).any()
    losses = []
    for chunk in (None, 3):
        model = build_model(LlamaConfig(loss_chunk_size=chunk), torch.float32)
        model.to_empty(device="cpu")
        model.init_weights(torch.Generator().manual_seed(0))
        losses.append(
            model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"]).loss
        )
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_torch_distributed_refuses_a_chunked_loss_with_the_head_split_over_tensor():
    from run.preflight import check_chunked_head
    from torchprime.errors import ConfigError

    tp = resolve_mesh(MeshAxesConfig(fsdp=2, tensor=2), MeshAxesConfig(), None)
    with pytest.raises(ConfigError, match="model.loss_chunk_size=8: on the torch.distributed"):
        check_chunked_head(8, {"lm_head.weight": ("tensor", "fsdp")}, tp)
    check_chunked_head(8, {"lm_head.weight": ("fsdp", None)}, tp)  # fsdp only: it runs
    check_chunked_head(None, {"lm_head.weight": ("tensor", "fsdp")}, tp)
