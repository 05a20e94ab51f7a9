"""The precision policy (precision.params, .compute, .optimizer_state): each policy trains, the
dtypes are where the policy puts them (parameters, optimizer state, the XLA graph's matmuls,
the checkpoint), and impossible or outdated keys stop the run naming the key."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from conftest import composed, requires_xla
from models import build_model
from models.llama import LlamaConfig
from torchprime.backend import select_backend
from torchprime.dtypes import DType
from torchprime.materialize import materialize
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.precision import Precision, PrecisionConfig, autocast_forward, resolve
from torchprime.rewriting import RematConfig, apply_rewriting
from trainers import make_trainer
from trainers.config import CheckpointConfig, TrainerConfig

F32, BF16 = DType.float32, DType.bfloat16
POLICIES = {
    "float32": PrecisionConfig(),
    "bf16 compute": PrecisionConfig(compute=BF16),
    "bf16 compute, bf16 state": PrecisionConfig(compute=BF16, optimizer_state=BF16),
    "bf16 params, fp32 state": PrecisionConfig(params=BF16, optimizer_state=F32),
    "bf16 everything": PrecisionConfig(params=BF16),
}
COMPARED = ("float32", "bf16 compute")
STEPS, ROWS, LENGTH = 100, 4, 64


def text_batches(steps: int = STEPS):
    """Rows of bytes of a standard-library module: something a tiny model learns in 100 steps."""
    data = torch.tensor(list(inspect.getsource(json.decoder).encode()), dtype=torch.long)
    rows = data[: len(data) // LENGTH * LENGTH].view(-1, LENGTH)
    for step in range(steps):
        ids = rows[torch.arange(step * ROWS, (step + 1) * ROWS) % len(rows)]
        yield {"input_ids": ids, "labels": ids}


def train(policy: PrecisionConfig, tmp_path, steps: int = STEPS):
    precision = resolve(policy)
    backend = select_backend("cpu", cpu_devices=1)
    mesh = resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    model = build_model(LlamaConfig(), precision.params)
    specs = {n: (None,) * p.dim() for n, p in model.named_parameters()}
    materialize(
        model, specs, mesh, backend, model.init_module_weights, torch.Generator().manual_seed(0)
    )
    apply_rewriting(model, RematConfig(), backend)
    autocast_forward(model, precision, backend.device.type)
    trainer = make_trainer(
        TrainerConfig(max_steps=STEPS, progress_bar=False, checkpoint=CheckpointConfig(keep=None)),
        model,
        backend,
        mesh,
        (),
        tmp_path,
        tokens_per_step=ROWS * LENGTH,
        optimizer_state_dtype=precision.optimizer_state,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only wait for each other on a busy machine
    try:
        losses = [trainer.train_step([b])["loss"].item() for b in text_batches(steps)]
    finally:
        torch.set_num_threads(threads)
    return precision, losses, trainer


def test_every_policy_trains_and_bf16_compute_lands_within_5_percent_of_float32(tmp_path):
    # float32 and bf16 compute for the 100 steps compared; the others 30 steps (cost)
    results = {
        name: train(p, tmp_path / name.replace(" ", "_"), STEPS if name in COMPARED else 30)
        for name, p in POLICIES.items()
    }
    final = {name: sum(losses[-10:]) / 10 for name, (_, losses, _) in results.items()}
    for name, (precision, losses, trainer) in results.items():
        assert all(map(torch.isfinite, torch.tensor(losses))), name
        assert final[name] < losses[0] - 1.0, (name, losses[0], final[name])  # it learns
        params = list(trainer.model.parameters())
        assert {p.dtype for p in params} == {precision.params}, name
        state = {
            v.dtype for p in params for k, v in trainer.optimizer.state[p].items() if k != "step"
        }
        assert state == {precision.optimizer_state or precision.params}, name
    gap = abs(final["bf16 compute"] - final["float32"]) / final["float32"]
    assert gap < 0.05, (final["bf16 compute"], final["float32"])


def test_the_checkpoint_holds_float32_master_weights_under_bf16_compute(tmp_path):
    precision, _, trainer = train(PrecisionConfig(compute=BF16), tmp_path, steps=2)
    assert precision.autocast and precision.compute == torch.bfloat16
    folder = trainer.checkpoints.save(STEPS, trainer)
    meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    weights = {k: v for k, v in meta.items() if k.endswith("q_proj.weight")}
    assert weights and {v.properties.dtype for v in weights.values()} == {torch.float32}


@requires_xla
@pytest.mark.parametrize("compute, expected", [(torch.float32, "f32"), (torch.bfloat16, "bf16")])
def test_xla_graph_matmuls_run_in_the_compute_dtype(compute, expected):
    backend = select_backend("xla", cpu_devices=4)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), 4)
    for chunk in (None, 5):
        cfg = LlamaConfig(num_hidden_layers=1, loss_chunk_size=chunk)
        model = build_model(cfg, torch.float32)
        specs = {n: ("fsdp",) + (None,) * (p.dim() - 1) for n, p in model.named_parameters()}
        materialize(
            model, specs, mesh, backend, model.init_module_weights, torch.Generator().manual_seed(0)
        )
        apply_rewriting(model, RematConfig(), backend)
        autocast_forward(model, Precision(torch.float32, compute, None), backend.device.type)
        ids = torch.randint(0, 264, (4, 16), generator=torch.Generator().manual_seed(1))
        loss = model(ids.to(backend.device), labels=ids.to(backend.device)).loss
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        text = backend.graph_text([loss, *grads])
        backend.sync()
        dots = re.findall(r"= (\w+)\[[^\]]*\]\S* dot\(([^)]*)\)", text)
        assert len(dots) >= 8  # q, k, v, o, 3 MLP, head: forward and backward
        operand_types = {t for _, operands in dots for t in re.findall(r"(\w+)\[", operands)}
        assert {out for out, _ in dots} == operand_types == {expected}, (chunk, dots[:3])
        assert loss.dtype == torch.float32 and {g.dtype for g in grads} == {torch.float32}


def test_bf16_params_with_fp32_compute_are_refused_naming_the_keys():
    problems = list(composed("precision.params=bfloat16", "precision.compute=float32").problems())
    assert any("precision.params=bfloat16 with precision.compute=float32" in p for p in problems)


def test_dtype_is_a_shorthand_for_params_and_compute_and_not_combined_with_them():
    cfg = composed("dtype=bfloat16")
    p = cfg.resolved_precision
    assert (p.params, p.compute, p.optimizer_state) == (torch.bfloat16, torch.bfloat16, None)
    assert not cfg.problems()
    problems = list(composed("dtype=bfloat16", "precision.compute=bfloat16").problems())
    assert any("dtype=bfloat16 is a shorthand for precision.params" in p for p in problems)


def test_the_old_optimizer_state_dtype_key_names_its_replacement():
    problems = list(composed("trainer.optimizer.state_dtype=float32").problems())
    assert any("write precision.optimizer_state=float32" in p for p in problems)


def test_pod_presets_keep_bf16_weights_and_their_moment_dtypes():
    p = composed("+config=llama3_8b_v5p_128").resolved_precision
    assert (p.params, p.compute, p.optimizer_state) == (
        torch.bfloat16,
        torch.bfloat16,
        torch.float32,
    )
