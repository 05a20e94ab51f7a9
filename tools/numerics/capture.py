"""One side's tensors on one batch: every layer's activations, the logits, the loss and, on
request, every parameter's gradient after one backward pass.

Forward hooks keep each captured module's output as it is made. On XLA these are lazy tensors
of the step's graph: they are read only after the step (`backend.sync()`), so the captured
values come out of the same compiled graph as the loss, with no extra graph per tensor, and
`backend.host_copy` gathers the sharded ones whole. The captured tensors become outputs of the
graph, which may change how XLA fuses it: the values are those of a graph that also returns
them.

Names, in forward order (the table's order):
  embeddings             model.embed_tokens
  layers.N.attn          model.layers.N.self_attn (after o_proj, before the residual add)
  layers.N.mlp           model.layers.N.mlp (before the residual add)
  layers.N               model.layers.N (the decoder layer's output)
  final_norm             model.norm
  logits                 lm_head, positions 0 .. T-2 (the last position predicts nothing)
  loss
  grad:PARAM             the gradient of parameter PARAM (--grads)
The module paths are the same in our model and in transformers', so one set of hooks serves
both.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.masks import segment_bias
from run.preflight import Devices, preflight
from run.training import place_model
from tools.numerics.sides import Side
from torchprime.backend import select_backend
from torchprime.backend.base import Backend
from torchprime.backend.eager import EagerBackend
from torchprime.errors import ConfigError, closest
from torchprime.sharding import BATCH_SPEC
from train_config import mesh_size

log = logging.getLogger(__name__)

GRAD = "grad:"
Batch = dict[str, torch.Tensor]


def activation_modules(num_layers: int) -> dict[str, str]:
    """Captured name → module path, in forward order."""
    names = {"embeddings": "model.embed_tokens"}
    for i in range(num_layers):
        names[f"layers.{i}.attn"] = f"model.layers.{i}.self_attn"
        names[f"layers.{i}.mlp"] = f"model.layers.{i}.mlp"
        names[f"layers.{i}"] = f"model.layers.{i}"
    names["final_norm"] = "model.norm"
    names["logits"] = "lm_head"
    return names


def all_names(num_layers: int, param_names: list[str], grads: bool) -> list[str]:
    """Every tensor a side captures, in table order."""
    names = [*activation_modules(num_layers), "loss"]
    return names + ([GRAD + p for p in param_names] if grads else [])


def select(names: list[str], patterns: list[str]) -> list[str]:
    """The names matching any of the glob `patterns` (all when there are none); a pattern
    matching nothing is a ConfigError naming it and the closest names."""
    if not patterns:
        return names
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(
                f"--tensors {pattern}: no such tensor; closest: {closest(pattern, names)} "
                f"(the model's layers are layers.0 to layers.{_last_layer(names)})."
            )
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _last_layer(names: list[str]) -> int:
    return max(int(n.split(".")[1]) for n in names if n.startswith("layers."))


@dataclass
class SideModel:
    """A side's model on its devices, ready to run batches."""

    side: Side
    model: nn.Module
    backend: Backend
    mesh: object | None
    """Our model's mesh (None for transformers' model, which runs on one CPU device)."""

    def describe(self) -> str:
        where = (
            "cpu"
            if self.mesh is None
            else f"{self.backend.describe()}, mesh {self.mesh.describe()}"
        )
        return f"{self.side.describe()} on {where}"


def build_side(side: Side, weights: Path | None, perturb: dict[str, float] | None = None):
    """The side's model with the compared weights: `weights` is an HF folder, or None for the
    seeded init of the side's config (our model only). `perturb` multiplies the named
    parameters by 1 + factor (a deliberately broken side, to see the tool find it)."""
    if side.hf:
        if weights is None:
            raise ValueError("transformers' model reads an HF folder: write the init as one")
        built = SideModel(side, _hf_model(side, weights), EagerBackend("cpu"), None)
    else:
        built = _our_model(side, weights)
    _perturb(built, perturb or {})
    return built


def _our_model(side: Side, weights: Path | None) -> SideModel:
    cfg = copy.deepcopy(side.cfg)  # the side's own config stays as the user wrote it
    if weights is not None:
        cfg.model.pretrained_path = str(weights)
    if cfg.model.remat.scan_layers:
        raise ConfigError(
            f"side {side.label}: model.remat.scan_layers={cfg.model.remat.scan_layers} runs the "
            "layers as one scanned loop, whose per-layer outputs cannot be read; compare with "
            "model/remat=none or layer (the numbers of a scan are the loop's)."
        )
    # A backend already running (XLA started by an earlier side or by the caller) is reused.
    backend = select_backend(cfg.backend, cpu_devices=cfg.cpu_devices or mesh_size(cfg) or 1)
    pre = preflight(cfg, Devices.of_backend(backend), open_data=False)
    if pre.problems:
        raise ConfigError(f"side {side.label}: {pre.error()}")
    return SideModel(side, place_model(pre, backend), backend, pre.mesh)


def _hf_model(side: Side, weights: Path) -> nn.Module:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        weights,
        dtype=side.cfg.dtype.torch,
        attn_implementation=str(side.cfg.model.attention_kernel),
    )
    return model.eval()


def _perturb(built: SideModel, factors: dict[str, float]) -> None:
    params = dict(built.model.named_parameters())
    for name, factor in factors.items():
        if name not in params:
            raise ConfigError(
                f"--perturb {name}: no such parameter; closest: {closest(name, params)}."
            )
        with torch.no_grad():
            params[name].mul_(1 + factor)
    if factors:
        built.backend.sync()


def capture(built: SideModel, batch: Batch, grads: bool, patterns: list[str] = ()) -> dict:
    """The captured tensors of one forward (and with `grads`, backward) pass over `batch`, on
    the host, in table order: name → tensor in the side's dtype."""
    model, backend = built.model, built.backend
    num_layers = len(model.model.layers)
    param_names = [n for n, _ in model.named_parameters()]
    wanted = select(all_names(num_layers, param_names, grads), list(patterns))
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[path].register_forward_hook(_keep_output(store, name))
        for name, path in activation_modules(num_layers).items()
        if name in wanted
    ]
    try:
        with torch.set_grad_enabled(grads):
            loss = _forward(built, _on_device(built, batch))
            if grads:
                loss.backward()
        store["loss"] = loss.detach()
        for name, param in model.named_parameters():
            if GRAD + name in wanted:
                store[GRAD + name] = param.grad
        # XLA: run the step's graph once; every kept tensor is one of its outputs.
        backend.sync()
        backend.wait_device_ops()
        seq_len = batch["input_ids"].shape[1]
        return {name: _host(backend, store[name], name, seq_len) for name in wanted}
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)


def _keep_output(store: dict[str, torch.Tensor], name: str):
    def hook(module: nn.Module, args, output) -> None:
        # transformers' attention returns (output, weights). The first call wins: a layer
        # recomputed in the backward pass (activation checkpointing) is not kept twice.
        if name not in store:
            store[name] = (output[0] if isinstance(output, tuple) else output).detach()

    return hook


def _host(backend: Backend, tensor: torch.Tensor, name: str, seq_len: int) -> torch.Tensor:
    host = backend.host_copy(tensor)
    if name == "logits" and host.shape[1] == seq_len:
        host = host[:, :-1]  # transformers (and shift_before_head=false) keep the last position
    return host.contiguous()


def _on_device(built: SideModel, batch: Batch) -> Batch:
    if built.mesh is None:
        return batch
    return {k: built.backend.place(v, built.mesh, BATCH_SPEC) for k, v in batch.items()}


def _forward(built: SideModel, batch: Batch) -> torch.Tensor:
    """The loss of `batch`, given to the model as the LM trainer gives it
    (trainers/lm_trainer.py)."""
    extra = {}
    if "position_ids" in batch:
        extra["position_ids"] = batch["position_ids"]
    if "segment_ids" in batch:
        if built.side.hf:
            raise ConfigError(
                f"side {built.side.label}: data.packing=document needs a document mask, which "
                "transformers' model is not given here; use data.packing=concat."
            )
        dtype = next(built.model.parameters()).dtype
        extra["attention_bias"] = segment_bias(batch["segment_ids"], dtype)
    out = built.model(input_ids=batch["input_ids"], labels=batch["labels"], **extra)
    return out.loss
