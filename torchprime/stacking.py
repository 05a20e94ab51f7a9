"""Scanned layers whose weights are stored stacked (`model.remat.stack_weights`).

torch_xla's `scan_layers` takes a list of layers: at every step it stacks each weight of every
layer into a [layers, ...] tensor for the scan and splits the gradients back per layer, and
the graph of those stacks and splits grows with depth. Here the stack of identical layers is
replaced, once, after the weights are placed, by a `StackedLayers`: one template layer whose
parameters are the stacked [layers, ...] tensors, sharded like one layer's weight with a
leading unsharded layer dimension. The scan takes them as its sequence input (xs) and binds
each step's slices into the template with `torch.func.functional_call`, so nothing is stacked
or split per step and the optimizer updates the stacked tensors themselves.

What the user sees keeps the per-layer (HF) names: everything before the rewriting (the meta
model of the pre-flight, sharding specs, the plan, materialization, `model.pretrained_path`)
runs on the per-layer model, and what comes after reads names through this module:
`parameter_aliases` (lr multipliers, weight decay), `per_layer_state` / `restack_state`
(checkpoints hold one tensor per layer, so a checkpoint written stacked loads unstacked and
the other way round), `per_layer_parameters` (`trainer.export_hf`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from torchprime.errors import ConfigError
from torchprime.mesh import PartitionSpec

#: The template layer's name inside a StackedLayers: `model.layers.layer.mlp.up_proj.weight`
#: is the [layers, ...] stack of `model.layers.{i}.mlp.up_proj.weight`.
TEMPLATE = "layer"

#: scan(step, carry, weights) → the last carry: the backend's scan over stacked weights.
StackedScan = Callable[[nn.Module, tuple, dict[str, torch.Tensor]], tuple]


class CarryLayer(nn.Module):
    """One layer as a scan step: carry (x, *shared) → (layer(x, *shared), *shared).

    x is one tensor, or (`state_size` not None) a tuple of that many tensors the layer
    updates, laid flat at the head of the carry (a mixture of experts' hidden states and
    router statistics). Inputs that are None (no attention bias, say) are left out of the
    carry, which holds tensors only, and put back in their places for the layer. Integer
    inputs (segment ids, token places) travel as float32, which holds them exactly below
    2**24: torch_xla's scan makes every carried tensor require gradients, which integer
    tensors cannot.
    """

    def __init__(
        self,
        layer: nn.Module,
        dtypes: tuple[torch.dtype | None, ...],
        state_size: int | None = None,
    ):
        super().__init__()
        self.layer = layer
        self.dtypes = dtypes
        self.state_size = state_size

    def forward(self, *carry: torch.Tensor):
        n = self.state_size or 1
        state, shared = carry[:n], carry[n:]
        it = iter(shared)
        full = [None if dtype is None else next(it).to(dtype) for dtype in self.dtypes]
        if self.state_size is None:
            return (self.layer(state[0], *full), *shared)
        return (*self.layer(tuple(state), *full), *shared)


def carried(t: torch.Tensor) -> torch.Tensor:
    """A shared input as the scan carries it (see CarryLayer)."""
    return t if t.is_floating_point() else t.float()


def scan_carry(x: Any, shared: tuple) -> tuple[tuple, int | None, tuple]:
    """For a stack called as (x, *shared): the key of its CarryLayer ((state size, dtypes of
    the shared inputs)), the state size, and the carry the scan starts from."""
    dtypes = tuple(None if s is None else s.dtype for s in shared)
    state_size = len(x) if isinstance(x, tuple) else None
    state = x if isinstance(x, tuple) else (x,)
    return (
        (state_size, dtypes),
        state_size,
        (*state, *(carried(s) for s in shared if s is not None)),
    )


def scan_result(out: tuple, state_size: int | None) -> Any:
    """What the stack returns from the scan's last carry: x's new value."""
    return out[0] if state_size is None else tuple(out[:state_size])


class StackedLayers(nn.Module):
    """`num_layers` identical layers whose weights are stored stacked, run as one scan.

    `layer` (the template) holds each parameter as [num_layers, ...]; `forward(x, *shared)`
    is the stack's: each layer applied in turn, layer i with slice i of every weight.
    """

    def __init__(
        self,
        template: nn.Module,
        num_layers: int,
        scan: StackedScan,
        layer_specs: dict[str, PartitionSpec],
        shard: Callable[[torch.Tensor, PartitionSpec], None],
    ):
        super().__init__()
        self.layer = template
        self.num_layers = num_layers
        self.scan = scan
        self.layer_specs = layer_specs
        """One layer's spec of each template parameter (the stack's minus the layer dim)."""
        self.shard = shard
        """Lays a tensor out on the mesh (a no-op off XLA)."""
        # One step module per pattern of absent inputs and dtypes, so that a pure scan finds
        # its traced step again on the next training step instead of tracing a new one.
        self._steps: dict[tuple, CarryLayer] = {}

    def forward(self, x: Any, *shared: torch.Tensor | None) -> Any:
        key, state_size, carry = scan_carry(x, shared)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = CarryLayer(self.layer, key[1], state_size)
        weights = {f"layer.{name}": p for name, p in self.layer.named_parameters()}
        return scan_result(self.scan(step, carry, weights), state_size)

    def unstack(self, name: str, tensor: torch.Tensor, copy: bool) -> list[torch.Tensor]:
        """The per-layer slices of `tensor` (the stack of template parameter `name`, or a
        tensor laid out like it): views, or with `copy` tensors of their own laid out as one
        layer's weight (on XLA, where a loaded view would not write through)."""
        if not copy:
            return list(tensor.detach().unbind(0))
        slices = [t.clone() for t in tensor.detach().unbind(0)]
        for s in slices:
            self.shard(s, self.layer_specs[name])
        return slices


def stacked_modules(model: nn.Module) -> dict[str, StackedLayers]:
    """Path → StackedLayers for every stack of stored-stacked layers in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, StackedLayers)}


def _split_name(name: str, stacks: dict[str, StackedLayers]) -> tuple[str, str] | None:
    """(stack path, template parameter name) when `name` is a stacked parameter's."""
    for path in stacks:
        prefix = f"{path}.{TEMPLATE}." if path else f"{TEMPLATE}."
        if name.startswith(prefix):
            return path, name[len(prefix) :]
    return None


def layer_names(path: str, num_layers: int, name: str) -> list[str]:
    """The per-layer names of template parameter `name` of the stack at `path`."""
    return [f"{path}.{i}.{name}" if path else f"{i}.{name}" for i in range(num_layers)]


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter name → the per-layer names the user knows it by: itself, or for a
    stacked parameter the name of each layer's weight in the stack, in layer order."""
    stacks = stacked_modules(model)
    aliases: dict[str, list[str]] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        split = _split_name(name, stacks)
        if split is None:
            aliases[name] = [name]
        else:
            path, rest = split
            aliases[name] = layer_names(path, stacks[path].num_layers, rest)
    return aliases


def per_layer_state(model: nn.Module, named: dict[str, Any], copy: bool) -> dict[str, Any]:
    """`named` (parameter name → tensor laid out like it, or a dict of such tensors: the
    optimizer state) with every stacked entry split into its per-layer names. Tensors shaped
    like the stack are split; others (a step count) are shared by every layer's entry."""
    stacks = stacked_modules(model)
    if not stacks:
        return named
    out: dict[str, Any] = {}
    for name, value in named.items():
        split = _split_name(name, stacks)
        if split is None:
            out[name] = value
            continue
        path, rest = split
        stack = stacks[path]
        names = layer_names(path, stack.num_layers, rest)
        shape = stack.layer.get_parameter(rest).shape
        if isinstance(value, torch.Tensor):
            out.update(zip(names, stack.unstack(rest, value, copy)))
            continue
        per_layer: list[dict[str, Any]] = [{} for _ in names]
        for key, t in value.items():
            parts = (
                stack.unstack(rest, t, copy)
                if isinstance(t, torch.Tensor) and t.shape == shape
                else [t] * len(names)
            )
            for entry, part in zip(per_layer, parts):
                entry[key] = part
        out.update(zip(names, per_layer))
    return out


@torch.no_grad()
def restack_state(model: nn.Module, named: dict[str, Any], per_layer: dict[str, Any]) -> None:
    """After a load into `per_layer` (what `per_layer_state(model, named, ...)` returned):
    copy each stacked entry's per-layer tensors back into the stacked tensor of `named`."""
    stacks = stacked_modules(model)
    for name, value in named.items():
        split = _split_name(name, stacks)
        if split is None:
            continue
        path, rest = split
        names = layer_names(path, stacks[path].num_layers, rest)
        if isinstance(value, torch.Tensor):
            value.copy_(torch.stack([per_layer[n] for n in names]))
            continue
        for key, t in value.items():
            parts = [per_layer[n][key] for n in names]
            if isinstance(t, torch.Tensor) and parts[0] is not t:
                t.copy_(torch.stack(parts) if t.dim() == parts[0].dim() + 1 else parts[0])


def per_layer_parameters(
    model: nn.Module, to_host: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(per-layer name, host tensor) for every parameter name (tied ones under each), a
    stacked parameter gathered once and split on the host."""
    aliases = parameter_aliases(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        names = aliases[name]
        if len(names) == 1:
            yield name, to_host(param)
        else:
            yield from zip(names, to_host(param).unbind(0))


def check_identical_layers(layers: list[nn.Module], key: str) -> None:
    """The layers have the same parameters (names, shapes, dtypes) and no buffers: a stacked
    scan binds one layer's slices into a single template."""
    first = {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in layers[0].named_parameters()}
    for i, layer in enumerate(layers[1:], start=1):
        if buffers := [n for n, _ in layer.named_buffers()]:
            raise ConfigError(f"{key}: layer {i} holds buffers ({', '.join(buffers)}).")
        mine = {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in layer.named_parameters()}
        if mine != first:
            differ = sorted(n for n in set(first) | set(mine) if first.get(n) != mine.get(n))
            raise ConfigError(
                f"{key}: layer {i} differs from layer 0 in {', '.join(differ)} "
                f"(layer 0: {[first.get(n) for n in differ]}, layer {i}: "
                f"{[mine.get(n) for n in differ]}); stacked weights need identical layers."
            )


def layer_specs(
    path: str, layers: list[nn.Module], specs: dict[str, PartitionSpec], key: str
) -> dict[str, PartitionSpec]:
    """Each template parameter's spec, which every layer must share (the stack has one)."""
    result: dict[str, PartitionSpec] = {}
    for name, param in layers[0].named_parameters():
        names = layer_names(path, len(layers), name)
        given = {n: specs.get(n, (None,) * param.dim()) for n in names}
        if len(set(given.values())) > 1:
            differing = ", ".join(f"{n}: {list(s)}" for n, s in given.items())
            raise ConfigError(
                f"{key}: the layers of the stacked {path} are given different specs "
                f"({differing}); their weights are one tensor [layers, ...], so every layer's "
                "must be the same."
            )
        result[name] = given[names[0]]
    return result


@torch.no_grad()
def stack_layers(
    model: nn.Module,
    path: str,
    scan: StackedScan,
    specs: dict[str, PartitionSpec],
    shard: Callable[[torch.Tensor, PartitionSpec], None],
) -> StackedLayers:
    """Replace the layer stack at `path` by a StackedLayers holding its weights stacked, each
    laid out as one layer's weight (`specs`, per-layer names) after an unsharded layer dim.
    Layer 0 becomes the template, so what was set on it (hooks, remat, offload) stays."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layers = list(getattr(parent, attr))
    check_identical_layers(layers, "model.remat.stack_weights")
    per_layer = layer_specs(path, layers, specs, "model.sharding.parameters")
    template = layers[0]
    for name in [n for n, _ in template.named_parameters()]:
        module_name, _, leaf = name.rpartition(".")
        owners = [layer.get_submodule(module_name) if module_name else layer for layer in layers]
        first = owners[0]._parameters[leaf]
        stacked = torch.stack([owner._parameters[leaf].detach() for owner in owners])
        shard(stacked, (None, *per_layer[name]))
        for owner in owners[1:]:
            del owner._parameters[leaf]  # the per-layer copy is not needed any more
        owners[0]._parameters[leaf] = nn.Parameter(stacked, requires_grad=first.requires_grad)
    stack = StackedLayers(template, len(layers), scan, per_layer, shard)
    setattr(parent, attr, stack)
    return stack


def meta_stacked(model: nn.Module, path: str) -> nn.Module:
    """A copy of meta `model` with the stack at `path` stored stacked (pre-flight checks of
    what the trainer will see: lr multipliers, weight decay)."""
    import copy

    twin = copy.deepcopy(model)
    twin_stack = list(twin.get_submodule(path))
    specs = {
        f"{path}.{i}.{n}": (None,) * p.dim()
        for i, layer in enumerate(twin_stack)
        for n, p in layer.named_parameters()
    }
    stack_layers(twin, path, _no_scan, specs, lambda t, s: None)
    return twin


def _no_scan(step: nn.Module, carry: tuple, weights: dict[str, torch.Tensor]) -> tuple:
    raise RuntimeError("a pre-flight copy of the model does not run")


def split_layer_dim_problem(
    raw_specs: dict[str, Any], model: nn.Module, path: str, key: str
) -> list[str]:
    """Specs of the stacked layers' parameters written with a layer dim (one entry more than
    the per-layer weight): the layer dim is never split, and specs name per-layer dims."""
    from torchprime.sharding import pattern_regex

    stack = model.get_submodule(path)
    names = {
        f"{path}.{i}.{n}": p.dim()
        for i, layer in enumerate(stack)
        for n, p in layer.named_parameters()
    }
    problems = []
    for pattern, raw in raw_specs.items():
        regex = pattern_regex(pattern)
        hit = next((n for n in names if regex.match(n)), None)
        if hit is None or not isinstance(raw, (list, tuple)) or len(raw) != names[hit] + 1:
            continue
        problems.append(
            f"{key}[{pattern!r}]={list(raw)}: with model.remat.stack_weights=true the stacked "
            f"weights get a leading layer dim that is never split (the scan steps through "
            f"it); give the {names[hit]} per-layer dims of {hit} only."
        )
    return problems
