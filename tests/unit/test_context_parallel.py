"""Context parallelism: the sequence split over `context` gives the numbers of one device.

On XLA with the 4 virtual devices of conftest, each case trains 3 steps (plain SGD, so the
weights move) and compares the loss and every gradient with the same model on one device
(eager, on the CPU): sharding changes where numbers are computed, not what they are. The
runtime's shardings show the sequence split in the inputs and between layers. The loss computed
in chunks (model.loss_chunk_size) gives the same numbers with the sequence split."""

from __future__ import annotations

import torch

from conftest import composed, requires_xla
from models import build_model
from models.llama import IGNORE_INDEX, LlamaConfig
from torchprime.context import context_problems, load_balance_order
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from trainers.lm_trainer import model_inputs

T, STEPS, LR = 64, 3, 0.5


def host_batch(document: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 264, (4, T), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if document:
        lengths = [[13, 40, 11], [13, 40, 11], [64], [33, 31]]
        segments = torch.tensor([sum(([s + 1] * n for s, n in enumerate(r)), []) for r in lengths])
        batch["position_ids"] = torch.stack(
            [torch.cat([torch.arange(n) for n in r]) for r in lengths]
        )
        batch["labels"][:, 1:][segments[:, 1:] != segments[:, :-1]] = IGNORE_INDEX
        batch["segment_ids"] = segments
    return batch


def train(model, batch, context, load_balance, backend=None):
    """(loss, {name: grad}) of each of STEPS steps, on the host."""
    seen = []
    for _ in range(STEPS):
        loss = model(**model_inputs(batch, context, load_balance)).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
        if backend is not None:
            backend.sync()
        seen.append((loss.detach().cpu(), {n: g.cpu() for n, g in grads.items()}))
    return seen


def one_device(cfg, batch):
    model = build_model(cfg, torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    return train(model, batch, 1, False)


CASES = [  # (context, fsdp, load balancing, document packing, kernel, layers scanned, loss chunk)
    (4, 1, False, False, "eager", False, None),
    # chunks of 24 positions: 6 of each device's 16, the last chunk holding the remainder
    (4, 1, True, True, "sdpa", False, 24),
    (2, 2, True, False, "eager", False, 16),
    (2, 2, False, True, "eager", True, None),  # segment ids carried through torch_xla's scan
]


@requires_xla
def test_the_sequence_split_over_context_gives_the_losses_and_gradients_of_one_device():
    from torchprime.backend import select_backend
    from torchprime.context import SequenceLayout, place_sequence_layout
    from torchprime.materialize import materialize
    from torchprime.rewriting import RematConfig, apply_rewriting
    from torchprime.sharding import (
        BATCH_SPEC,
        plan_activation_specs,
        plan_parameter_specs,
        shard_activations,
    )

    backend = select_backend("xla", cpu_devices=4)
    sharding = composed("model/sharding=fsdp_cp").model.sharding
    errors = {}
    for context, fsdp, balance, document, kernel, scan, chunk in CASES:
        cfg = LlamaConfig(num_hidden_layers=2, attention_kernel=kernel)
        expected = one_device(cfg, host_batch(document))
        cfg = LlamaConfig(
            num_hidden_layers=2,
            attention_kernel=kernel,
            load_balance_context=balance,
            loss_chunk_size=chunk,
        )
        mesh = resolve_mesh(MeshAxesConfig(fsdp=fsdp, context=context), MeshAxesConfig(), 4)
        model = build_model(cfg, torch.float32)
        specs = plan_parameter_specs(model, sharding, mesh)
        init = torch.Generator().manual_seed(0)
        materialize(model, specs, mesh, backend, model.init_module_weights, init)
        shard_activations(model, plan_activation_specs(model, sharding), mesh, backend)
        assert place_sequence_layout(model, SequenceLayout(backend, mesh)) == 2
        model.loss_position_groups = context  # as run/training.py sets it
        layer_out = []
        model.model.layers[0].register_forward_hook(
            lambda m, a, out, seen=layer_out: seen.append(out)
        )
        if scan:
            apply_rewriting(model, RematConfig(scan_layers="model.layers"), backend)
        batch = next(backend.device_loader([host_batch(document)], mesh, BATCH_SPEC))
        if chunk:  # each chunk takes chunk / N positions of every device's block of the rows
            graph = backend.graph_text([model(**model_inputs(batch, context, balance)).loss])
            assert f"f32[{4 * context},{chunk // context},264]" in graph
            assert f"f32[4,{chunk},264]" not in graph
        got = train(model, batch, context, balance, backend)

        # the sequence (dimension 1) is split over context in the inputs and between layers
        tiles = f"{fsdp},{context}"
        for name, tensor in batch.items():
            assert backend.sharding_of(tensor) == f"{{devices=[{tiles}]0,1,2,3}}", name
        if not scan:  # a scanned layer is traced once, without its hooks
            assert backend.sharding_of(layer_out[0]) == f"{{devices=[{tiles},1]0,1,2,3}}"
        loss_error = max(abs(g[0] - e[0]).item() for g, e in zip(got, expected))
        grad_error = max(
            (g[1][n] - e[1][n]).abs().max().item() for g, e in zip(got, expected) for n in g[1]
        )
        errors[(context, fsdp, balance, document, kernel, scan, chunk)] = (loss_error, grad_error)
        assert got[-1][0] < got[0][0]  # it trains
    print(errors)  # the closing note's figures (pytest -s)
    assert all(loss <= 1e-5 and grad <= 1e-5 for loss, grad in errors.values()), errors


def test_load_balancing_pairs_chunk_i_with_chunk_2n_minus_1_minus_i():
    order = load_balance_order(16, 2)  # 4 chunks of 4: device 0 holds 0 and 3, device 1 1 and 2
    assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    # every device has the same causal work: the keys its queries see, summed
    work = (order + 1).view(2, 8).sum(1)
    assert work.tolist() == [68, 68]
    assert load_balance_order(8, 1).tolist() == list(range(8))


def test_a_load_balanced_batch_keeps_every_token_its_place_and_target():
    batch = host_batch(document=True)
    inputs = model_inputs(batch, context=2, load_balance=True)
    order = inputs["token_index"]
    assert set(inputs) == {
        "input_ids", "targets", "position_ids", "segment_ids", "token_index"
    }  # fmt: skip
    # each token travels with its position, segment and the label of the token after it
    for key in ("input_ids", "position_ids", "segment_ids"):
        assert torch.equal(inputs[key], batch[key][:, order])
    last = order == T - 1
    assert torch.equal(inputs["targets"][:, ~last], batch["labels"][:, order[~last] + 1])
    assert (inputs["targets"][:, last] == IGNORE_INDEX).all()


def problems(mesh_axes, seq=4096, balance=False, kernel="eager", qkv=None, heads=32, **kw):
    mesh = resolve_mesh(MeshAxesConfig(**mesh_axes), MeshAxesConfig(**kw.pop("dcn", {})), None)
    args = dict(load_balance=balance, kernel=kernel, qkv_spec=qkv, num_heads=heads)
    args |= dict(engine=kw.pop("engine", "xla"), sequence_split=kw.pop("split", True))
    return list(context_problems(mesh, seq, **args))


HEADS_SPLIT = (("data", "fsdp"), ("tensor", "context"), None, None)


def test_bad_context_configs_are_refused_naming_the_keys_and_numbers():
    assert problems({"context": 4}) == []
    assert problems({"context": 2}, seq=8192, kernel="splash", qkv=HEADS_SPLIT) == []
    (p,) = problems({"context": 4}, seq=1002)
    assert p == (
        "data.block_size=1002 does not split over context=4 (ici_mesh.context=4 x "
        "dcn_mesh.context=1): make it a multiple of 4."
    )
    (p,) = problems({"context": 2}, seq=4092, balance=True, dcn={"context": 2})
    assert "context=4 (ici_mesh.context=2 x dcn_mesh.context=2) into " in p
    assert "model.load_balance_context's 2 x 4 = 8 chunks: make it a multiple of 8" in p
    (p,) = problems({"context": 2}, split=False)
    assert "model.sharding.activations leaves the layers' sequence whole" in p
    assert "model/sharding=fsdp_cp" in p
    (p,) = problems({"context": 2}, engine="torch.distributed")
    assert "runs on the XLA engine only; this run is on torch.distributed" in p
    found = problems({"context": 2}, balance=True, kernel="flash", qkv=HEADS_SPLIT, heads=15)
    assert len(found) == 2
    assert "model.load_balance_context=true with model.attention_kernel=flash" in found[0]
    assert found[1].startswith("model.num_attention_heads=15 does not split over the 2 devices")
    (p,) = problems({"context": 2}, kernel="splash", qkv=(("data", "fsdp"), "tensor", None, None))
    assert "splits heads over context; model.sharding.qkv=[[data, fsdp], tensor, null, null]" in p
    (p,) = problems({"fsdp": 2}, kernel="flash", qkv=(("data", "fsdp"), None, "context", None))
    assert p.startswith("model.sharding.qkv=[[data, fsdp], null, context, null] splits the seq")


def test_the_preflight_reports_context_problems_with_the_plan_per_device():
    from run.preflight import Devices, preflight

    xla4 = Devices(kind="CPU", count=4)
    cfg = composed("ici_mesh.fsdp=1", "ici_mesh.context=4", "model.load_balance_context=true")
    cfg.data.block_size = 100  # not 8 chunks; and the fsdp preset leaves the sequence whole
    pre = preflight(cfg, xla4, open_data=False)
    assert [p.split(":")[0] for p in pre.problems] == [
        "data.block_size=100 does not split over context=4 (ici_mesh.context=4 x "
        "dcn_mesh.context=1) into model.load_balance_context's 2 x 4 = 8 chunks",
        "context=4 (ici_mesh.context=4 x dcn_mesh.context=1), but model.sharding.activations "
        "leaves the layers' sequence whole, so every context device would compute the same "
        "tokens",
    ]
    # not split: the estimate counts whole rows per device
    rows = cfg.trainer.global_batch_size // cfg.trainer.grad_accum_steps  # one data device
    assert pre.sequence_split == 1 and pre.activations.tokens == rows * 100
    cfg = composed(
        "ici_mesh.fsdp=1", "ici_mesh.context=4", "model/sharding=fsdp_cp", "data.packing=document"
    )
    pre = preflight(cfg, xla4, open_data=False)
    assert pre.ok, list(pre.problems)
    assert pre.sequence_split == 4
    assert pre.activations.tokens == rows * cfg.data.block_size // 4


def test_the_cp_presets_are_their_base_presets_with_the_sequence_over_context():
    for preset, base in (("fsdp_cp", "fsdp"), ("fsdp_tp_cp", "fsdp_tp")):
        cp = composed(f"model/sharding={preset}").model.sharding
        assert cp.parameters == composed(f"model/sharding={base}").model.sharding.parameters
        assert cp.activations["model.layers.*"] == [["data", "fsdp"], "context", None]
        assert cp.qkv == [["data", "fsdp"], ["tensor", "context"], None, None]
