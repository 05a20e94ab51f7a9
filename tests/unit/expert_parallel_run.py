"""Expert-parallel training steps of the tiny Mixtral against one device, for
tests/unit/test_expert_parallel.py: in its process (4 devices) or as a script in a process of
its own, whose device count the XLA runtime fixes at start:

    python tests/unit/expert_parallel_run.py DEVICES '[{"expert": 4, "fsdp": 2}]' ROUTING [HLO_DIR]

prints one JSON line per mesh: the loss and gradient errors against one device, the runtime
shardings of the expert weights and, with HLO_DIR (one mesh only), the collectives of XLA's
partitioned step read by torchprime/collectives.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS, LR, ROWS, T = 3, 0.5, 8, 32


def moe_config(routing: str = "capacity_per_row", **overrides):
    """The tiny Mixtral (model=tiny_moe) in 2 layers, with the moe_fsdp_ep sharding preset and
    `routing` (model.moe_implementation)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train_config import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("default", overrides=["model=tiny_moe", "model/sharding=moe_fsdp_ep"])
    model = OmegaConf.to_object(cfg).model
    return dataclasses.replace(model, num_hidden_layers=2, moe_implementation=routing, **overrides)


def host_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 259, (ROWS, T), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}


def train(model, batch, backend=None):
    """(loss, {name: grad}) of each of STEPS plain SGD steps, on the host."""
    seen = []
    for _ in range(STEPS):
        loss = model(**batch).loss
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


def one_device(cfg):
    from models import build_model

    model = build_model(cfg, torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    return train(model, host_batch())


def run_case(cfg, axes: dict[str, int], backend, expected) -> dict:
    """The mesh `axes` over the backend's devices: errors against `expected`, shardings."""
    from models import build_model
    from torchprime.experts import ExpertLayout, place_expert_layout
    from torchprime.materialize import materialize
    from torchprime.mesh import MeshAxesConfig, resolve_mesh
    from torchprime.sharding import (
        BATCH_SPEC,
        dispatch_spec,
        plan_activation_specs,
        plan_parameter_specs,
        shard_activations,
    )

    mesh = resolve_mesh(MeshAxesConfig(**axes), MeshAxesConfig(), backend.device_count)
    model = build_model(cfg, torch.float32)
    specs = plan_parameter_specs(model, cfg.sharding, mesh)
    init = torch.Generator().manual_seed(0)
    materialize(model, specs, mesh, backend, model.init_module_weights, init)
    shard_activations(model, plan_activation_specs(model, cfg.sharding), mesh, backend)
    layout = ExpertLayout(backend, mesh, dispatch_spec(cfg.sharding))
    blocks = place_expert_layout(model, layout)
    batch = next(backend.device_loader([host_batch()], mesh, BATCH_SPEC))
    got = train(model, batch, backend)
    experts = model.model.layers[0].mlp.experts
    return {
        "axes": axes,
        "blocks": blocks,
        "losses": [g[0].item() for g in got],
        "loss_error": max(abs(g[0] - e[0]).item() for g, e in zip(got, expected)),
        "grad_error": max(
            (g[1][n] - e[1][n]).abs().max().item() for g, e in zip(got, expected) for n in g[1]
        ),
        "gate_up_proj": backend.sharding_of(experts.gate_up_proj),
        "down_proj": backend.sharding_of(experts.down_proj),
        "batch": backend.sharding_of(batch["input_ids"]),
    }


def collectives(dump: Path, cfg, axes: dict[str, int]) -> dict:
    """The partitioned step's collectives and flags, as the dry run's audit reads them."""
    from models import build_model
    from torchprime.collectives import audit, parse_collectives, step_module
    from torchprime.mesh import MeshAxesConfig, resolve_mesh
    from torchprime.plan import make_plan
    from torchprime.sharding import plan_parameter_specs

    mesh = resolve_mesh(MeshAxesConfig(**axes), MeshAxesConfig(), None)
    module = step_module(dump)
    meta = build_model(cfg, torch.float32)
    plan = make_plan(meta, plan_parameter_specs(meta, cfg.sharding, mesh), mesh)
    found = audit(parse_collectives(module.read_text(), mesh, str(module)), plan, 2, str(module))
    return {"rows": [dataclasses.asdict(r) for r in found.rows], "flags": found.flags}


def main(devices: int, meshes: list[dict[str, int]], routing: str, dump: Path | None) -> None:
    os.environ["PJRT_DEVICE"] = "CPU"
    os.environ["CPU_NUM_DEVICES"] = str(devices)
    sys.path.insert(0, str(ROOT))
    from torchprime.backend import select_backend

    # The runtime first: a CPU backward before it would break every later XLA backward.
    backend = select_backend("xla", cpu_devices=devices, hlo_dump_dir=dump)
    cfg = moe_config(routing)
    expected = one_device(cfg)
    for axes in meshes:
        result = run_case(cfg, axes, backend, expected)
        if dump is not None:
            result["collectives"] = collectives(dump, cfg, axes)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        json.loads(sys.argv[2]),
        sys.argv[3],
        Path(sys.argv[4]) if len(sys.argv) > 4 else None,
    )
