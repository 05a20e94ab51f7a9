"""The numerics comparison tool (tools/numerics): where two sides' numbers part, layer by layer.

Both sides run in this process (`run_in_process`): conftest started XLA with 4 virtual devices
before any backward pass, which is what running a CPU and an XLA side together needs. The
command line, a process per side, is tested in tests/e2e/test_numerics_cli.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import requires_xla
from tools.numerics.job import check, make_batches, new_job, run_in_process
from tools.numerics.weights import write_hf_folder
from torchprime.backend.eager import EagerBackend
from torchprime.errors import ConfigError
from trainers.checkpoint import save_checkpoint

CPU = "backend=cpu ici_mesh.fsdp=1"
SHORT = dict(seq_lens=[64])
#: Every activation the tiny model (4 layers) shows, in forward order.
FORWARD = [
    "embeddings",
    *(f"layers.{i}{part}" for i in range(4) for part in (".attn", ".mlp", "")),
    "final_norm",
    "logits",
    "loss",
]


def by_name(result):
    (comparison,) = result.comparisons
    return {t.name: t for t in comparison.tensors}


@requires_xla
def test_cpu_and_xla_fsdp4_agree_below_1e5_at_every_layer_and_gradient():
    result = run_in_process(new_job(CPU, "backend=xla ici_mesh.fsdp=4", grads=True, **SHORT))
    tensors = by_name(result)
    print("\n" + result.text())
    assert list(tensors)[: len(FORWARD)] == FORWARD
    assert len(tensors) == len(FORWARD) + 4 * 9 + 3  # every parameter's gradient
    assert tensors["logits"].shape == [4, 63, 264]  # batch 4: one row a device
    for t in tensors.values():
        assert t.rel_err < 1e-5 and t.max_abs_err < 1e-5, t
        assert t.cosine > 1 - 1e-9, t
    assert result.comparisons[0].first_past is None and not result.past_tolerance


def test_ours_matches_transformers_below_1e5():
    # Ours draws the seeded init itself; transformers reads it from the HF folder written
    # from that init: agreement also shows the two are the same weights.
    result = run_in_process(new_job(CPU, "hf", grads=True, **SHORT))
    tensors = by_name(result)
    assert "transformers" in result.b
    assert list(tensors)[: len(FORWARD)] == FORWARD
    for t in tensors.values():
        assert t.rel_err < 1e-5, t
    assert tensors["logits"].max_abs_a > 0.5  # far from zero: the tolerance means something


def test_bfloat16_against_float32_shows_the_larger_error_it_has():
    result = run_in_process(new_job(CPU, f"{CPU} dtype=bfloat16", **SHORT))
    tensors = by_name(result)
    print("\n" + result.text())
    # bfloat16 keeps 8 significant bits: relative errors of a few 1e-3, not 1e-7.
    for name in FORWARD[:-1]:
        assert 1e-4 < tensors[name].rel_err < 5e-2, tensors[name]
    assert result.comparisons[0].first_past.name == "embeddings"
    assert "embeddings" in result.text().split("<- first past 1e-05")[0].splitlines()[-1]


@pytest.mark.parametrize(
    "param, found_at",
    [
        ("model.layers.2.mlp.down_proj.weight", "layers.2.mlp"),
        ("model.layers.1.self_attn.q_proj.weight", "layers.1.attn"),
    ],
)
def test_a_perturbed_weight_is_found_at_its_layer(param, found_at):
    # 1 % of one weight: past 1e-5 at its layer whatever the batch (0.1 % of q_proj is not)
    result = run_in_process(new_job(CPU, CPU, perturb={param: 1e-2}, **SHORT))
    tensors = by_name(result)
    assert result.comparisons[0].first_past.name == found_at
    before = FORWARD[: FORWARD.index(found_at)]
    assert all(tensors[n].max_abs_err == 0 for n in before)  # same code, same numbers
    assert tensors[found_at].past_tolerance


def test_checkpoint_weights_are_read_as_the_run_saved_them_by_both_sides(tmp_path):
    job = new_job(CPU, "hf")
    from models import build_model

    model = build_model(job.a.cfg.model, torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(123))  # not the config's seed
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    save_checkpoint(tmp_path / "checkpoints", 7, {"model": model.state_dict()}, EagerBackend("cpu"))

    folder = write_hf_folder(str(tmp_path), job.a.cfg, tmp_path / "hf")
    saved = load_file(folder / "model.safetensors")
    assert set(saved) == set(state)
    for name, tensor in state.items():
        assert torch.equal(saved[name], tensor), name

    # Both sides run on them: the reference's loss is the saved model's on the same batch.
    job = new_job(CPU, "hf", weights=str(tmp_path), **SHORT)
    tensors = by_name(run_in_process(job))
    (batch,) = make_batches(job.a, 1, [64])
    with torch.no_grad():
        expected = model(batch["input_ids"], labels=batch["labels"]).loss.item()
    assert abs(tensors["loss"].max_abs_a - expected) < 1e-5
    assert all(t.rel_err < 1e-5 for t in tensors.values())


# -- bad input: errors that name the value --------------------------------------------------


def test_sides_with_different_architectures_are_refused_naming_the_difference():
    with pytest.raises(ConfigError, match=r"model\.num_hidden_layers: a=2, b=4"):
        check(new_job(f"{CPU} model.num_hidden_layers=2", CPU))


def test_sides_with_different_seeded_weights_are_refused_naming_the_seed():
    with pytest.raises(ConfigError, match=r"seed: a=1, b=42"):
        check(new_job(f"{CPU} seed=1", CPU))


def test_a_batch_that_does_not_fit_the_mesh_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"--batch-size=6 .* 4 data-parallel .* fsdp=4"):
        check(new_job(CPU, "backend=xla ici_mesh.fsdp=4", batch_size=6))


def test_a_layer_that_does_not_exist_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"--tensors layers\.7: .* layers\.0 to layers\.3"):
        run_in_process(new_job(CPU, CPU, tensors=["layers.7"], **SHORT))
    with pytest.raises(ConfigError, match=r"--perturb model\.layers\.9\.mlp\.up_proj\.weight"):
        run_in_process(new_job(CPU, CPU, perturb={"model.layers.9.mlp.up_proj.weight": 1}))


def test_unknown_weights_and_sides_are_refused_naming_them(tmp_path):
    with pytest.raises(ConfigError, match=f"--weights {tmp_path}: neither"):
        check(new_job(CPU, CPU, weights=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"side b .*dtype=float16"):
        new_job(CPU, "dtype=float16")
    with pytest.raises(ConfigError, match=r"side b: backend=xla with hf"):
        new_job(CPU, "hf backend=xla")
