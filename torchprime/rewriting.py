"""Model rewriting from config: scan, rematerialization, optimization barriers, XLA linear.

Applied from outside the model, by module paths and class names, in this fixed order:
  1. `patch_linear`: nn.Linear → torch_xla's einsum linear (XLA only), which keeps batch and
     sequence sharding through the matmul where the default lowering reshapes it away;
  2. `activation_checkpoint_layers`: those modules recompute their activations in backward;
  3. `scan_layers`: the layer stack at that path runs as one scanned loop (XLA: torch_xla's
     scan, so compile time does not grow with depth; eager: the same loop, same numbers). A
     scanned layer class that is also checkpointed is rematerialized by the scan itself.
     With `stack_weights` the stack's weights are stored stacked ([layers, ...]) and the scan
     takes them as its sequence input (torchprime/stacking.py);
  4. `offload_tensors`: inside the scan, the activations the model marked with those names
     (torchprime.offload) are the only ones kept for backward, in host memory; the rest is
     recomputed. TPU only: elsewhere a warning and no offload, or an error with
     `offload_strict`;
  5. `optimization_barrier_layers`: those modules' inputs (forward) and gradients (backward)
     pass through optimization barriers, so XLA cannot fuse across them and undo the remat
     (not inside a scan, whose loop body is kept apart already);
  6. on XLA, the model's `loss_barrier` (a chunked loss, model.loss_chunk_size) is the
     backend's optimization barrier, which keeps its recomputed chunks apart, and modules
     with a `static_shapes` flag (a mixture of experts' routing) are told to use it.
On XLA, only a whole scanned layer can be checkpointed inside a scan, not a part of it.
Each name must match something in the model; the error lists the closest real names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchprime import offload
from torchprime.backend.base import Backend
from torchprime.errors import ConfigError, closest
from torchprime.mesh import Mesh, PartitionSpec
from torchprime.stacking import (
    CarryLayer,
    check_identical_layers,
    scan_carry,
    scan_result,
    stack_layers,
)

log = logging.getLogger(__name__)


@dataclass
class RematConfig:
    """How the model is rewritten for compile time and memory (configs/model/remat/)."""

    scan_layers: str | None = None
    """Path of a homogeneous layer stack to run as a scan (e.g. model.layers); null: unrolled."""
    activation_checkpoint_layers: list[str] = field(default_factory=list)
    """Module class names whose activations are recomputed in backward (e.g. LlamaDecoderLayer;
    a subclass answers to its base's name: MixtralDecoderLayer to LlamaDecoderLayer)."""
    optimization_barrier_layers: list[str] = field(default_factory=list)
    """Module class names wrapped in optimization barriers (forward inputs, backward grads),
    matched as activation_checkpoint_layers are."""
    pure_layers: bool = True
    """The scanned layer has no side effects, so its traced graph is reused (faster tracing)."""
    patch_linear: bool = True
    """On XLA, replace nn.Linear by torch_xla's einsum linear to keep activation sharding."""
    offload_tensors: list[str] = field(default_factory=list)
    """Activation names (the model's `offload_names`) kept in host memory for backward, all
    else recomputed; needs scan_layers. TPU only."""
    offload_strict: bool = False
    """Refuse to start where host offload cannot run, instead of warning and running without."""
    stack_weights: bool = False
    """With scan_layers: store the scanned layers' parameters stacked, one [layers, ...]
    tensor per weight (the layer dim never sharded), which the scan takes as its sequence
    input, so nothing is stacked or split per step and compile time stays flat in depth.
    false: torch_xla's scan_layers, which stacks the per-layer weights at every step and
    splits their gradients back. Names stay per layer for sharding patterns, lr multipliers,
    checkpoints and HF export (torchprime/stacking.py). XLA and one-device eager only."""


def class_names(module: nn.Module) -> set[str]:
    """The names a module answers to in `activation_checkpoint_layers` and
    `optimization_barrier_layers`: its class's and its base classes' (a MixtralDecoderLayer
    is a LlamaDecoderLayer with experts, so the remat presets serve both families)."""
    return {c.__name__ for c in type(module).__mro__ if issubclass(c, nn.Module)} - {"Module"}


def listed_name(module: nn.Module, names: list[str]) -> str:
    """The name in `names` that `module` answers to, else its own class name."""
    return next((n for n in names if n in class_names(module)), type(module).__name__)


def check_remat(model: nn.Module, cfg: RematConfig, key: str = "model.remat") -> None:
    """Every path and class name in `cfg` names something in `model`."""
    classes = sorted(set().union(*(class_names(m) for m in model.modules())))
    for list_key in ("activation_checkpoint_layers", "optimization_barrier_layers"):
        for name in getattr(cfg, list_key):
            if name not in classes:
                raise ConfigError(
                    f"{key}.{list_key}: no module of class {name!r} in the model. Closest "
                    f"classes: {closest(name, classes)}."
                )
    if cfg.offload_tensors:
        known = list(getattr(model, "offload_names", ()))
        for name in cfg.offload_tensors:
            if name not in known:
                raise ConfigError(
                    f"{key}.offload_tensors: the model marks no activation {name!r}. Closest: "
                    f"{closest(name, known)} (all: {', '.join(known) or 'none'})."
                )
        if cfg.scan_layers is None:
            raise ConfigError(
                f"{key}.offload_tensors needs {key}.scan_layers: activations are offloaded "
                "by the scan's partitioner."
            )
    if cfg.stack_weights and cfg.scan_layers is None:
        raise ConfigError(
            f"{key}.stack_weights=true needs {key}.scan_layers: the stacked weights are the "
            "scan's sequence input."
        )
    if cfg.scan_layers is not None:
        stack = _stack(model, cfg.scan_layers, key)
        kinds = {type(layer).__name__ for layer in stack}
        if len(kinds) > 1:
            raise ConfigError(
                f"{key}.scan_layers={cfg.scan_layers!r} holds layers of several classes "
                f"({', '.join(sorted(kinds))}); a scan needs identical layers."
            )
        if cfg.stack_weights:
            check_identical_layers(list(stack), f"{key}.stack_weights ({cfg.scan_layers})")


def _stack(model: nn.Module, path: str, key: str) -> nn.ModuleList:
    paths = [name for name, _ in model.named_modules() if name]
    try:
        stack = model.get_submodule(path)
    except AttributeError:
        raise ConfigError(
            f"{key}.scan_layers={path!r}: no such module. Closest paths: {closest(path, paths)}."
        ) from None
    if not isinstance(stack, nn.ModuleList) or type(stack).forward is nn.ModuleList.forward:
        raise ConfigError(
            f"{key}.scan_layers={path!r} is a {type(stack).__name__}, not a layer stack the "
            "model calls as one module (models.llama.LayerStack)."
        )
    return stack


def _inside_scan(model: nn.Module, cfg: RematConfig) -> list[nn.Module]:
    """Modules strictly inside the scanned layers (not the layers themselves)."""
    if cfg.scan_layers is None:
        return []
    stack = _stack(model, cfg.scan_layers, "model.remat")
    return [m for layer in stack for m in layer.modules() if m is not layer]


def apply_rewriting(
    model: nn.Module,
    cfg: RematConfig,
    backend: Backend,
    specs: dict[str, PartitionSpec] | None = None,
    mesh: Mesh | None = None,
) -> None:
    """Rewrite `model` in place as `cfg` says, in the order of this module's docstring.
    `specs` and `mesh` (the parameters' layout) lay out stacked weights (`stack_weights`);
    without them they are left unsharded."""
    check_remat(model, cfg)
    inside = _inside_scan(model, cfg)
    if backend.is_xla:
        inside_names = set().union(set(), *(class_names(m) for m in inside))
        nested = sorted(inside_names & set(cfg.activation_checkpoint_layers))
        if nested:
            # torch_xla's checkpoint is reentrant, and scan computes gradients with
            # autograd.grad, which reentrant checkpointing refuses.
            raise ConfigError(
                f"model.remat.activation_checkpoint_layers: {', '.join(nested)} sits inside the "
                f"scanned {cfg.scan_layers}; on XLA checkpoint the whole scanned layer instead."
            )
    if cfg.patch_linear and backend.is_xla:
        backend.patch_linear(model)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # the patch makes new Linear modules, untying a tied head
    scanned: set[int] = set()
    remat = False
    if cfg.scan_layers is not None:
        stack = _stack(model, cfg.scan_layers, "model.remat")
        scanned = {id(layer) for layer in stack}
        remat = bool(class_names(next(iter(stack))) & set(cfg.activation_checkpoint_layers))
    checkpointed = set(cfg.activation_checkpoint_layers)
    for module in list(model.modules()):
        if class_names(module) & checkpointed and id(module) not in scanned:
            _checkpoint_forward(module, backend)
    offloaded = _offloaded(cfg, backend)
    offload.activate(model, offloaded)
    if cfg.scan_layers is not None:
        if cfg.stack_weights:
            _stack_weights(model, cfg, backend, specs or {}, mesh, remat, offloaded)
        else:
            _scan_forward(stack, backend, remat=remat, pure=cfg.pure_layers, offloaded=offloaded)
    scanned |= {id(m) for m in inside}
    for module in model.modules():
        if not class_names(module) & set(cfg.optimization_barrier_layers):
            continue
        if backend.is_xla and id(module) in scanned:
            # A scan's loop body is compiled apart from its neighbours already, and barriers
            # traced into the body would be dropped: leave these modules as they are.
            log.info("model.remat: no barrier on %s inside the scan", type(module).__name__)
            continue
        _barrier_forward(module, backend)
    if backend.is_xla and hasattr(model, "loss_barrier"):
        model.loss_barrier = backend.optimization_barrier_
    if backend.is_xla:
        # XLA compiles a graph per shape: a block that can route with data-dependent shapes
        # (a mixture of experts' dropless routing) takes its static form (models/moe.py).
        for module in model.modules():
            if hasattr(module, "static_shapes"):
                module.static_shapes = True


def _offloaded(cfg: RematConfig, backend: Backend) -> frozenset[str]:
    """The activation names to offload on this backend."""
    names = frozenset(cfg.offload_tensors)
    if names and not backend.supports_host_offload:
        where = f"{backend.name} ({backend.device_kind})"
        if cfg.offload_strict:
            raise ConfigError(
                f"model.remat.offload_tensors={sorted(names)}: host offload runs on TPU only, "
                f"not on {where}; set model.remat.offload_strict=false to run without it."
            )
        log.warning(
            "model.remat.offload_tensors=%s: host offload runs on TPU only; on %s the scan "
            "keeps these activations in device memory.",
            sorted(names),
            where,
        )
        names = frozenset()
    return names


def _swap_forward(module: nn.Module, wrap) -> None:
    """Give `module` a subclass (same name) whose forward is `wrap(self, base_forward, *args)`.

    A class-level forward, not an instance attribute: scan deep-copies the first layer and
    calls the copy with each layer's weights (functional_call), so a wrapper must find its
    module through `self`, never through a closure over the original module.
    """
    cls = type(module)
    base_forward = cls.forward

    def forward(self, *args: Any) -> Any:
        return wrap(self, base_forward, *args)

    module.__class__ = type(
        cls.__name__, (cls,), {"forward": forward, "__qualname__": cls.__qualname__}
    )


def _checkpoint_forward(module: nn.Module, backend: Backend) -> None:
    def checkpointed(self: nn.Module, base_forward, *args: Any) -> Any:
        return backend.checkpoint(lambda *a: base_forward(self, *a), *args)

    _swap_forward(module, checkpointed)


def _barrier_forward(module: nn.Module, backend: Backend) -> None:
    def with_barrier(self: nn.Module, base_forward, *args: Any) -> Any:
        backend.optimization_barrier_([a for a in args if isinstance(a, torch.Tensor)])
        return base_forward(self, *args)

    _swap_forward(module, with_barrier)
    backend.add_backward_barrier(module)


def _stack_weights(
    model: nn.Module,
    cfg: RematConfig,
    backend: Backend,
    specs: dict[str, PartitionSpec],
    mesh: Mesh | None,
    remat: bool,
    offloaded: frozenset[str],
) -> None:
    def scan(step: nn.Module, carry: tuple, weights: dict[str, torch.Tensor]) -> tuple:
        return backend.scan_stacked(
            step, carry, weights, remat=remat, pure=cfg.pure_layers, offloaded=offloaded
        )

    def shard(tensor: torch.Tensor, spec: PartitionSpec) -> None:
        if mesh is not None and any(entry is not None for entry in spec):
            backend.mark_sharding(tensor, mesh, spec)

    stack_layers(model, cfg.scan_layers, scan, specs, shard)
    # The stacks are lazy on XLA: run them now, so the per-layer weights are freed at once.
    backend.sync()


def _scan_forward(
    stack: nn.ModuleList, backend: Backend, remat: bool, pure: bool, offloaded: frozenset[str]
) -> None:
    # Wrappers are kept per pattern of absent inputs and dtypes, so that a pure scan finds its
    # traced layer again on the next step instead of tracing a new one.
    wrappers: dict[tuple, list[CarryLayer]] = {}

    def scanned(self: nn.ModuleList, base_forward, x: Any, *shared: Any) -> Any:
        key, state_size, carry = scan_carry(x, shared)
        if key not in wrappers:
            wrappers[key] = [CarryLayer(layer, key[1], state_size) for layer in self]
        out = backend.scan_layers(wrappers[key], carry, remat=remat, pure=pure, offloaded=offloaded)
        return scan_result(out, state_size)

    _swap_forward(stack, scanned)
