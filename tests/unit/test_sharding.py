"""Parameter specs from name patterns: matching, validation errors, and (on XLA) the shardings
the runtime really holds."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_xla
from models import build_model
from models.llama import LlamaConfig
from torchprime.errors import ConfigError
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.sharding import ShardingConfig, plan_parameter_specs, replicated

MESH4 = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), 4)


def tiny(**sharding):
    cfg = LlamaConfig(sharding=ShardingConfig(parameters=sharding))
    return build_model(cfg, torch.float32), cfg


def test_star_matches_every_layer_and_the_rest_is_replicated():
    model, cfg = tiny(**{"model.layers.*.mlp.down_proj.weight": [None, "fsdp"]})
    specs = plan_parameter_specs(model, cfg.sharding, MESH4)
    downs = [n for n in specs if n.endswith("down_proj.weight")]
    assert len(downs) == 4 and all(specs[n] == (None, "fsdp") for n in downs)
    assert specs["model.embed_tokens.weight"] == (None, None)
    assert "lm_head.weight" in replicated(specs)


def test_a_pattern_matching_nothing_lists_the_closest_names():
    model, cfg = tiny(**{"model.layers.*.mlp.down_prj.weight": [None, "fsdp"]})
    with pytest.raises(ConfigError, match=r"matches no parameter.*down_proj\.weight"):
        plan_parameter_specs(model, cfg.sharding, MESH4)


def test_an_unknown_axis_suggests_the_right_one():
    model, cfg = tiny(**{"lm_head.weight": ["fdsp", None]})
    with pytest.raises(ConfigError, match=r"unknown mesh axis 'fdsp' \(did you mean 'fsdp'\?\)"):
        plan_parameter_specs(model, cfg.sharding, MESH4)


def test_a_spec_of_the_wrong_length_shows_the_shape():
    model, cfg = tiny(**{"model.norm.weight": ["fsdp", None]})
    with pytest.raises(ConfigError, match=r"has 2 entries but model.norm.weight has 1 dim"):
        plan_parameter_specs(model, cfg.sharding, MESH4)


def test_a_dimension_the_axes_do_not_divide_is_an_error():
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4, tensor=2), MeshAxesConfig(), 8)
    model, cfg = tiny(**{"model.norm.weight": [["fsdp", "tensor"]]})
    plan_parameter_specs(model, cfg.sharding, mesh)  # 128 / 8: fine
    mesh = resolve_mesh(MeshAxesConfig(fsdp=-1), MeshAxesConfig(), 3)
    with pytest.raises(
        ConfigError, match=r"dimension 0 has size 128, which \[fsdp, tensor\] \(mesh size 3\)"
    ):
        plan_parameter_specs(model, cfg.sharding, mesh)


@requires_xla
def test_the_runtime_holds_the_shardings_the_config_asked_for():
    from torchprime.backend import select_backend
    from torchprime.materialize import materialize

    backend = select_backend("xla", cpu_devices=4)
    model, cfg = tiny(
        **{
            "model.embed_tokens.weight": ["fsdp", None],
            "model.layers.*.mlp.down_proj.weight": [None, "fsdp"],
        }
    )
    specs = plan_parameter_specs(model, cfg.sharding, MESH4)
    generator = torch.Generator().manual_seed(0)
    materialize(model, specs, MESH4, backend, model.init_module_weights, generator)
    params = dict(model.named_parameters())
    assert backend.sharding_of(params["model.embed_tokens.weight"]) == "{devices=[4,1]0,1,2,3}"
    assert backend.sharding_of(params["model.layers.2.mlp.down_proj.weight"]) == (
        "{devices=[1,4]0,1,2,3}"
    )
    assert backend.sharding_of(params["lm_head.weight"]) in (None, "{replicated}")
    # The same numbers as an unsharded CPU init from the same seed.
    reference, _ = tiny()
    reference.to_empty(device="cpu")
    reference.init_weights(torch.Generator().manual_seed(0))
    for name, param in reference.named_parameters():
        torch.testing.assert_close(params[name].cpu(), param, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(
        model.model.rotary_emb.inv_freq.cpu(), reference.model.rotary_emb.inv_freq
    )

    # A training step keeps the parameters, and the optimizer state, sharded as asked.
    from trainers.base_trainer import build_optimizer
    from trainers.config import TrainerConfig

    opt = build_optimizer(model, TrainerConfig(), backend)
    ids = torch.randint(0, 264, (4, 16)).to(backend.device)
    model(ids, labels=ids).loss.backward()
    opt.step()
    backend.sync()
    embed = params["model.embed_tokens.weight"]
    assert backend.sharding_of(embed) == "{devices=[4,1]0,1,2,3}"
    assert backend.sharding_of(opt.state[embed]["exp_avg"]) == "{devices=[4,1]0,1,2,3}"


@requires_xla
def test_vectors_are_sharded_too():
    from torchprime.backend import select_backend

    backend = select_backend("xla", cpu_devices=4)
    t = backend.place(torch.arange(16.0), MESH4, ("fsdp",))
    assert backend.sharding_of(t) == "{devices=[4]0,1,2,3}"
    assert torch.equal(t.cpu(), torch.arange(16.0))


def test_activation_patterns_must_match_a_module():
    from torchprime.sharding import plan_activation_specs

    model, cfg = tiny()
    cfg.sharding.activations = {"model.layer.*": [["data", "fsdp"], None, None]}
    with pytest.raises(
        ConfigError,
        match=r"activations\['model.layer.\*'\] matches no module. "
        r"Closest names: .*model.layers",
    ):
        plan_activation_specs(model, cfg.sharding)
    cfg.sharding.activations = {"model.layers.*[0]": [["data", "fsdp"], None, None]}
    plans = plan_activation_specs(model, cfg.sharding)
    assert [(p.module, p.index) for p in plans] == [(f"model.layers.{i}", 0) for i in range(4)]


@requires_xla
def test_activations_and_inputs_carry_the_asked_shardings_on_xla():
    from torchprime.backend import select_backend
    from torchprime.materialize import materialize
    from torchprime.sharding import BATCH_SPEC, plan_activation_specs, shard_activations

    backend = select_backend("xla", cpu_devices=4)
    model, cfg = tiny()
    cfg.sharding.activations = {
        "model.layers.*": [["data", "fsdp"], None, None],
        "model.norm": [None, "fsdp", None],
    }
    specs = plan_parameter_specs(model, cfg.sharding, MESH4)
    materialize(model, specs, MESH4, backend, model.init_module_weights, torch.Generator())
    shard_activations(model, plan_activation_specs(model, cfg.sharding), MESH4, backend)
    seen = {}
    model.model.layers[1].register_forward_hook(lambda m, a, out: seen.update(layer=out))
    model.model.norm.register_forward_hook(lambda m, a, out: seen.update(norm=out))

    ids = torch.randint(0, 264, (4, 16))
    batch = next(backend.device_loader([{"input_ids": ids}], MESH4, BATCH_SPEC))
    assert backend.sharding_of(batch["input_ids"]) == "{devices=[4,1]0,1,2,3}"
    model(batch["input_ids"])
    assert backend.sharding_of(seen["layer"]) == "{devices=[4,1,1]0,1,2,3}"
    assert backend.sharding_of(seen["norm"]) == "{devices=[1,4,1]0,1,2,3}"

    bad, bad_cfg = tiny()
    bad_cfg.sharding.activations = {"model.norm": [None, "fsdp", None]}
    materialize(
        bad,
        plan_parameter_specs(bad, bad_cfg.sharding, MESH4),
        MESH4,
        backend,
        bad.init_module_weights,
        torch.Generator(),
    )
    shard_activations(bad, plan_activation_specs(bad, bad_cfg.sharding), MESH4, backend)
    with pytest.raises(ConfigError, match=r"the output of model.norm has size 6 in dimension 1"):
        bad(torch.randint(0, 264, (4, 6)).to(backend.device))
