"""Stacked-weight scan (model.remat.stack_weights): the numbers of the per-layer model, one
[layers, ...] tensor per weight that the scan steps through, per-layer names wherever the user
looks (lr multipliers, checkpoints both ways, HF export), bad inputs refused at start-up."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import requires_xla
from models import build_model
from models.hf import save_hf
from models.llama import LlamaConfig
from optimizers.groups import param_groups
from run.preflight import Devices, preflight
from torchprime.backend import select_backend
from torchprime.errors import ConfigError
from torchprime.materialize import materialize
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.rewriting import RematConfig, apply_rewriting, check_remat
from torchprime.sharding import ShardingConfig, plan_parameter_specs
from torchprime.stacking import parameter_aliases
from train_config import TrainConfig
from trainers import make_trainer
from trainers.base_trainer import build_optimizer
from trainers.checkpoint import load_checkpoint, save_checkpoint
from trainers.config import TrainerConfig

STACKED = RematConfig(scan_layers="model.layers", stack_weights=True)
PER_LAYER = RematConfig()
FSDP = {
    "model.embed_tokens.weight": ["fsdp", None],
    "model.layers.*.self_attn.q_proj.weight": ["fsdp", None],
    "model.layers.*.mlp.up_proj.weight": ["fsdp", None],
    "model.layers.*.mlp.down_proj.weight": [None, "fsdp"],
    "lm_head.weight": ["fsdp", None],
}
CPU = select_backend("cpu", cpu_devices=1)
ONE = resolve_mesh(MeshAxesConfig(fsdp=1), MeshAxesConfig(), None)


def build(backend, mesh, remat, seed=0, layers=2):
    cfg = LlamaConfig(
        num_hidden_layers=layers,
        sharding=ShardingConfig(parameters=FSDP if backend.is_xla else {}),
    )
    model = build_model(cfg, torch.float32)
    specs = plan_parameter_specs(model, cfg.sharding, mesh)
    generator = torch.Generator().manual_seed(seed)
    materialize(model, specs, mesh, backend, model.init_module_weights, generator)
    apply_rewriting(model, remat, backend, specs, mesh)
    return model


def per_layer(model: nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`named` (parameter name → tensor like it) on the host, under per-layer names."""
    aliases, out = parameter_aliases(model), {}
    for name, t in named.items():
        host = t.detach().cpu()
        out.update(zip(aliases[name], host.unbind(0) if len(aliases[name]) > 1 else [host]))
    return out


def ids(step: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 264, (4, 16), generator=g).to(device)


def flat(state, prefix=""):
    out = {}
    for k, v in state.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def host(state) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in flat(state).items()}


@requires_xla
def test_on_xla_fsdp4_three_steps_match_the_per_layer_model_and_the_graph_keeps_its_size():
    backend = select_backend("xla", cpu_devices=4)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), 4)
    runs = {}
    for name, remat in (("per_layer", PER_LAYER), ("stacked", STACKED)):
        model = build(backend, mesh, remat)
        optimizer = build_optimizer(model, TrainerConfig(), backend)
        losses, grads = [], []
        for step in range(3):
            x = ids(step, backend.device)
            loss = model(x, labels=x).loss
            loss.backward()
            step_grads = {n: p.grad for n, p in model.named_parameters()}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            backend.sync()
            losses.append(loss.detach().cpu())
            grads.append(per_layer(model, step_grads))
        runs[name] = (losses, grads, model)
    (base_losses, base_grads, _), (losses, grads, stacked) = runs["per_layer"], runs["stacked"]
    for step in range(3):
        torch.testing.assert_close(losses[step], base_losses[step], rtol=0, atol=1e-5)
        assert grads[step].keys() == base_grads[step].keys()
        for n, g in grads[step].items():
            torch.testing.assert_close(g, base_grads[step][n], rtol=0, atol=1e-5, msg=n)
    # One [layers, ...] tensor per weight: a layer's spec after an unsharded layer dim.
    up = stacked.get_parameter("model.layers.layer.mlp.up_proj.weight")
    assert tuple(up.shape) == (2, 384, 128)
    assert backend.sharding_of(up).startswith("{devices=[1,4,1]")
    down = stacked.get_parameter("model.layers.layer.mlp.down_proj.weight")
    assert backend.sharding_of(down).startswith("{devices=[1,1,4]")
    # Nothing is stacked or split per step: the step graph is the same size at 2 and 8 layers.
    sizes = {}
    for layers in (2, 8):
        model = build(backend, mesh, STACKED, layers=layers)
        x = ids(0, backend.device)
        loss = model(x, labels=x).loss
        loss.backward()
        text = backend.graph_text([loss, *(p.grad for p in model.parameters())])
        sizes[layers] = (len(text.splitlines()), text.count("concatenate("))
    assert sizes[2] == sizes[8]


@requires_xla
def test_on_xla_a_stacked_checkpoint_loads_per_layer_and_back(tmp_path):
    backend = select_backend("xla", cpu_devices=4)
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4), MeshAxesConfig(), 4)

    def trainer(remat, seed, name):
        model = build(backend, mesh, remat, seed=seed)
        cfg = TrainerConfig(progress_bar=False, max_steps=4)
        batches = iter([])
        return make_trainer(cfg, model, backend, mesh, batches, tmp_path / name, tokens_per_step=64)

    stacked = trainer(STACKED, 0, "a")
    x = ids(0, backend.device)
    stacked.train_step([{"input_ids": x, "labels": x}])
    backend.sync()
    compiled = backend.compile_count()
    path = save_checkpoint(tmp_path / "a", 1, stacked.checkpoint_tensors(), backend)
    # the per-layer copies' graph was compiled with the trainer, not at this save (after
    # warm-up it would count as a recompilation: trainer.fail_on_recompile)
    assert backend.compile_count() == compiled
    saved = host(stacked.checkpoint_tensors())
    assert "model.model.layers.1.mlp.up_proj.weight" in saved  # per-layer names on disk
    assert not any(".layer." in k for k in saved)
    # written stacked, loaded per layer
    unstacked = trainer(PER_LAYER, 1, "b")
    tensors = unstacked.checkpoint_tensors()
    load_checkpoint(path, tensors, backend)
    unstacked.tensors_loaded(tensors)
    loaded = host(unstacked.checkpoint_tensors())
    assert loaded.keys() == saved.keys()
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k], rtol=0, atol=0, msg=k)
    # written per layer, loaded stacked (into other weights and zero moments)
    path = save_checkpoint(tmp_path / "b", 1, unstacked.checkpoint_tensors(), backend)
    again = trainer(STACKED, 2, "c")
    tensors = again.checkpoint_tensors()
    load_checkpoint(path, tensors, backend)
    again.tensors_loaded(tensors)
    for k, v in host(again.checkpoint_tensors()).items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    # the stacks keep their layout through the load (weights and moments)
    up = again.model.get_parameter("model.layers.layer.mlp.up_proj.weight")
    for t in (up, again.optimizer.state[up]["exp_avg"]):
        assert backend.sharding_of(t).startswith("{devices=[1,4,1]")


def test_on_eager_checkpoints_load_both_ways_and_export_hf_has_per_layer_names(tmp_path):
    def trainer(remat, seed, name):
        model = build(CPU, ONE, remat, seed=seed)
        cfg = TrainerConfig(progress_bar=False, max_steps=4)
        return make_trainer(cfg, model, CPU, ONE, iter([]), tmp_path / name, tokens_per_step=64)

    per = trainer(PER_LAYER, 0, "a")
    stacked = trainer(STACKED, 0, "b")
    for t in (per, stacked):  # the same step both ways
        x = ids(0, CPU.device)
        t.train_step([{"input_ids": x, "labels": x}])
    assert host(stacked.checkpoint_tensors()).keys() == host(per.checkpoint_tensors()).keys()
    for source, target_remat in ((stacked, PER_LAYER), (per, STACKED)):
        path = save_checkpoint(tmp_path / f"from_{id(source)}", 1, source.checkpoint_tensors(), CPU)
        target = trainer(target_remat, 3, f"to_{id(source)}")
        tensors = target.checkpoint_tensors()
        load_checkpoint(path, tensors, CPU)
        target.tensors_loaded(tensors)
        want = host(source.checkpoint_tensors())
        for k, v in host(target.checkpoint_tensors()).items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)
    save_hf(per.model, tmp_path / "hf_per")
    save_hf(stacked.model, tmp_path / "hf_stacked")
    a = load_file(tmp_path / "hf_per" / "model.safetensors")
    b = load_file(tmp_path / "hf_stacked" / "model.safetensors")
    assert a.keys() == b.keys() and "model.layers.1.mlp.up_proj.weight" in b
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_lr_multipliers_and_weight_decay_follow_the_per_layer_names():
    model = build(CPU, ONE, STACKED)
    groups = param_groups(model, 0.1, {"model.layers.*.mlp.up_proj.weight": 2.0})
    up = model.get_parameter("model.layers.layer.mlp.up_proj.weight")
    norm = model.get_parameter("model.layers.layer.input_layernorm.weight")
    (up_group,) = [g for g in groups if any(p is up for p in g["params"])]
    (norm_group,) = [g for g in groups if any(p is norm for p in g["params"])]
    assert (up_group["lr_multiplier"], up_group["weight_decay"]) == (2.0, 0.1)
    assert (norm_group["lr_multiplier"], norm_group["weight_decay"]) == (1.0, 0.0)  # a norm
    with pytest.raises(ConfigError, match=r"\['model.layers.0.mlp.up_proj.weight'\] matches 1 of"):
        param_groups(model, 0.1, {"model.layers.0.mlp.up_proj.weight": 2.0})


def test_bad_stacked_configs_are_refused_at_start_up_naming_the_key():
    cpu = Devices.of_backend(CPU)
    cfg = TrainConfig()
    cfg.ici_mesh = MeshAxesConfig(fsdp=1)
    cfg.model.remat = RematConfig(stack_weights=True)
    (problem,) = preflight(cfg, cpu, open_data=False).problems
    assert problem.startswith("model.remat.stack_weights=true needs model.remat.scan_layers")

    cfg.model.remat = STACKED
    cfg.model.sharding.parameters = {
        "model.layers.0.mlp.up_proj.weight": ["fsdp", None],
        "model.layers.*.mlp.down_proj.weight": [None, "fsdp", None],
    }
    cfg.trainer.optimizer.lr_multipliers = {"model.layers.1.self_attn.q_proj.weight": 0.5}
    problems = preflight(cfg, cpu, open_data=False).problems
    text = "\n".join(problems)
    assert "parameters['model.layers.*.mlp.down_proj.weight']=[None, 'fsdp', None]" in text
    assert "leading layer dim that is never split" in text
    # the spec of wrong length stops the specs, so layers given different specs are checked
    # on their own below
    assert "lr_multipliers['model.layers.1.self_attn.q_proj.weight'] matches 1 of the 4" in text
    cfg.model.sharding.parameters = {"model.layers.0.mlp.up_proj.weight": ["fsdp", None]}
    cfg.trainer.optimizer.lr_multipliers = {}
    (problem,) = preflight(cfg, cpu, open_data=False).problems
    assert problem.startswith("model.sharding.parameters: the layers of the stacked model.layers")
    assert "model.layers.0.mlp.up_proj.weight: ['fsdp', None]" in problem

    cfg.model.sharding.parameters = {}
    cfg.ici_mesh = MeshAxesConfig(fsdp=2)
    torchrun = Devices(kind="CPU", count=2, engine="torch.distributed")
    problems = preflight(cfg, torchrun, open_data=False).problems
    assert any(
        p.startswith("model.remat.stack_weights=true: stacked weights run on XLA") for p in problems
    )

    model = build_model(LlamaConfig(), torch.float32)
    model.model.layers[2].mlp = type(model.model.layers[2].mlp)(LlamaConfig(intermediate_size=256))
    with pytest.raises(ConfigError, match=r"stack_weights \(model.layers\): layer 2 differs"):
        check_remat(model, STACKED)


def test_a_mixture_of_experts_stored_stacked_gives_the_loss_router_metrics_and_grads():
    """The Mixtral layer carries its router statistics through the stacked scan too."""
    from models.mixtral import MixtralConfig

    results = []
    for remat in (PER_LAYER, RematConfig(scan_layers="model.layers", stack_weights=True)):
        cfg = MixtralConfig(
            intermediate_size=96,
            num_hidden_layers=3,
            moe_implementation="capacity",
            capacity_factor=1.0,  # some tokens dropped: the counts must carry across layers
        )
        model = build_model(cfg, torch.float32)
        specs = plan_parameter_specs(model, cfg.sharding, ONE)
        generator = torch.Generator().manual_seed(0)
        materialize(model, specs, ONE, CPU, model.init_module_weights, generator)
        apply_rewriting(model, remat, CPU, specs, ONE)
        batch = ids(0, "cpu")
        out = model(batch, labels=batch)
        out.loss.backward()
        grads = per_layer(model, {n: p.grad for n, p in model.named_parameters()})
        results.append((out.loss.item(), {k: v.item() for k, v in out.metrics.items()}, grads))
    (loss, metrics, grads), (s_loss, s_metrics, s_grads) = results
    assert metrics["dropped_fraction"] > 0
    assert abs(loss - s_loss) < 1e-6
    assert metrics.keys() == s_metrics.keys()
    for k in metrics:
        assert abs(metrics[k] - s_metrics[k]) < 1e-6, k
    assert grads.keys() == s_grads.keys()
    for name in grads:
        torch.testing.assert_close(s_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
