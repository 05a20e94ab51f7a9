"""trainer.compile: torch.compile on the eager backends, with the uncompiled step's numbers and
the uncompiled model's names.

The compiler backend here is aot_eager: the same graph capture and autograd as the default
(inductor), without its C++ code generation, which takes about a minute on a 2-core machine.
`python -m bench` runs the default compiler and checks its loss against the eager one.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from models import build_model
from models.llama import LlamaConfig
from torchprime.backend import select_backend
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from trainers import make_trainer
from trainers.config import TrainerConfig

BACKEND = select_backend("cpu", cpu_devices=1)
MESH = resolve_mesh(MeshAxesConfig(fsdp=1), MeshAxesConfig(), None)
# As small as a Llama gets, so that compiling takes seconds.
SMALL = LlamaConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def trainer(tmp_path, compile: bool):
    model = build_model(SMALL, torch.float32).to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    cfg = TrainerConfig(compile=compile, progress_bar=False)
    return make_trainer(cfg, model, BACKEND, MESH, (), tmp_path, tokens_per_step=4 * 16)


def batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 259, (4, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """Two steps, uncompiled and compiled, from the same weights and batches."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        root = tmp_path_factory.mktemp("compile")
        eager, compiled = trainer(root / "eager", False), trainer(root / "compiled", True)
        # The second step runs on the weights the first one updated.
        metrics = [(eager.train_step([batch(s)]), compiled.train_step([batch(s)])) for s in (0, 1)]
    return eager, compiled, metrics


def test_a_compiled_step_gives_the_loss_and_weights_of_an_uncompiled_one(steps):
    eager, compiled, metrics = steps
    assert "forward" in vars(compiled) and "forward" not in vars(eager)
    for a, b in metrics:
        assert b["loss"].item() == pytest.approx(a["loss"].item(), abs=1e-6)
        assert b["grad_norm"].item() == pytest.approx(a["grad_norm"].item(), rel=1e-5)
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_compiling_keeps_parameter_names_and_the_hf_export(steps, tmp_path):
    eager, compiled, _ = steps
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())
    assert list(compiled.checkpoint_tensors()["optimizer"]) == list(
        eager.checkpoint_tensors()["optimizer"]
    )
    compiled.export_hf(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


def test_compile_is_ignored_on_xla_with_a_note(tmp_path, caplog):
    class XlaLike(type(BACKEND)):
        is_xla = True

    model = build_model(SMALL, torch.float32).to_empty(device="cpu")
    with caplog.at_level(logging.WARNING):
        t = make_trainer(
            TrainerConfig(compile=True),
            model,
            XlaLike("cpu"),
            MESH,
            (),
            tmp_path,
            tokens_per_step=64,
        )
    assert "trainer.compile=true is ignored on XLA" in caplog.text
    assert "forward" not in vars(t)  # the trainer's own method, not a compiled one
