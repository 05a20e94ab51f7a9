"""Sharding from config: parameter name patterns → partition specs, checked before anything runs.

Spec grammar (YAML), one entry per tensor dimension:
  - an axis name (`fsdp`): the dimension is split over that mesh axis;
  - a list of axes (`[data, fsdp]`): split over their product, the first axis outermost;
  - `null`: not split.
A pattern is a parameter's dotted name where `*` stands for one name component (a layer index):
`model.layers.*.mlp.down_proj.weight: [null, fsdp]`.
Parameters no pattern matches stay replicated, and are reported as such.

Activations are named by the module whose output they are, with `[i]` for element i of a tuple
output: `model.layers.*: [[data, fsdp], null, null]`. The annotation also applies to the gradient
flowing back through that output, so the backward pass is laid out the same way.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchprime.backend.base import Backend
from torchprime.errors import ConfigError, Problems, closest
from torchprime.mesh import AXES, BATCH_AXES, Mesh, PartitionSpec, describe_batch_axes

#: The input batch [batch, sequence]: rows split over every data-parallel axis (expert
#: parallelism's included, torchprime/mesh.py BATCH_AXES), the sequence over `context`
#: (context parallelism, torchprime/context.py; one device by default).
BATCH_SPEC: PartitionSpec = (BATCH_AXES, "context")


@dataclass
class ShardingConfig:
    """How parameters are laid out on the mesh (see this module's docstring for the grammar)."""

    parameters: dict[str, Any] = field(default_factory=dict)
    """Parameter name pattern → partition spec (one entry per dimension)."""
    activations: dict[str, Any] = field(default_factory=dict)
    """Module name pattern (with `[i]` for element i of a tuple output) → partition spec of
    that module's output and of the gradient flowing back through it."""
    qkv: list[Any] = field(default_factory=lambda: [["data", "fsdp"], "tensor", None, None])
    """Spec of the [batch, heads, sequence, head_dim] queries, keys and values a Pallas
    attention kernel (flash, splash) runs on, each device on its own shard."""
    dispatch: list[Any] | None = None
    """Spec of a mixture-of-experts layer's expert buffers (the dispatched tokens and the
    experts' outputs, [experts, rows, capacity, hidden]), annotated through the model's
    `constrain_dispatch` seam (torchprime/experts.py); null: not annotated."""


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """`*` matches one dotted name component; everything else matches itself."""
    return re.compile("[^.]+".join(re.escape(part) for part in pattern.split("*")) + r"\Z")


def parse_spec(raw: Any, key: str) -> PartitionSpec:
    """A YAML spec (list of axis / list of axes / null) as a partition spec, axes checked."""
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{key}: a spec is a list with one entry per dimension, got {raw!r}.")
    spec: list[str | tuple[str, ...] | None] = []
    for entry in raw:
        names = [entry] if isinstance(entry, str) else list(entry) if entry is not None else []
        for name in names:
            if name not in AXES:
                close = difflib.get_close_matches(str(name), AXES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"{key}: unknown mesh axis {name!r}{hint}; axes are {', '.join(AXES)}."
                )
        if entry is None or isinstance(entry, str):
            spec.append(entry)
        else:
            spec.append(tuple(names))
    return tuple(spec)


def _show_entry(entry: str | tuple[str, ...] | None) -> str:
    return entry if isinstance(entry, str) else f"[{', '.join(entry or ())}]"


def _matching(pattern: str, names: list[str], where: str, kind: str) -> list[str]:
    """The names `pattern` matches; an error listing the closest names when there are none."""
    regex = pattern_regex(pattern)
    matched = [name for name in names if regex.match(name)]
    if not matched:
        raise ConfigError(f"{where} matches no {kind}. Closest names: {closest(pattern, names)}.")
    return matched


def plan_parameter_specs(
    model: nn.Module, cfg: ShardingConfig, mesh: Mesh, key: str = "model.sharding.parameters"
) -> dict[str, PartitionSpec]:
    """Every parameter's spec (all-None when replicated), after checking the config.

    Errors name the pattern: one that matches no parameter (with the closest real names), a
    spec of the wrong length, an unknown axis, or a dimension its axes do not divide.
    """
    # Tied parameters appear under every name (the LM head and the embedding, say), so a
    # pattern may name either; they must not be given different layouts.
    params = dict(model.named_parameters(remove_duplicate=False))
    specs: dict[str, PartitionSpec] = {}
    found = Problems()  # every pattern's first problem, so one run reports them all
    for pattern, raw in cfg.parameters.items():
        found.attempt(_plan_pattern, pattern, raw, params, mesh, specs, key)
    found.raise_if_any()
    return _unify_tied(params, specs, key)


def _plan_pattern(
    pattern: str,
    raw: Any,
    params: dict[str, torch.nn.Parameter],
    mesh: Mesh,
    specs: dict[str, PartitionSpec],
    key: str,
) -> None:
    """Add the specs `pattern` gives to `specs`, or raise its first problem."""
    where = f"{key}[{pattern!r}]"
    spec = parse_spec(raw, where)
    for name in _matching(pattern, list(params), where, "parameter"):
        shape = tuple(params[name].shape)
        if len(spec) != len(shape):
            raise ConfigError(
                f"{where}: spec {list(raw)} has {len(spec)} entries but {name} has "
                f"{len(shape)} dimensions {list(shape)}."
            )
        for dim, (size, entry) in enumerate(zip(shape, spec)):
            if size % mesh.size(entry):
                raise ConfigError(
                    f"{where}: {name} dimension {dim} has size {size}, which "
                    f"{_show_entry(entry)} (mesh size {mesh.size(entry)}) does not divide."
                )
        if name in specs and specs[name] != spec:
            raise ConfigError(f"{where}: {name} is already sharded by another pattern.")
        specs[name] = spec


def _unify_tied(
    params: dict[str, torch.nn.Parameter], specs: dict[str, PartitionSpec], key: str
) -> dict[str, PartitionSpec]:
    """One spec per tensor: the one its names were given (or replicated), under every name."""
    names_of: dict[int, list[str]] = {}
    for name, param in params.items():
        names_of.setdefault(id(param), []).append(name)
    result: dict[str, PartitionSpec] = {}
    for names in names_of.values():
        given = {specs[n] for n in names if n in specs}
        if len(given) > 1:
            raise ConfigError(
                f"{key}: {' and '.join(names)} are one tied tensor but are given different "
                f"specs {sorted(map(list, given))}."
            )
        spec = given.pop() if given else (None,) * params[names[0]].dim()
        for n in names:
            result[n] = spec
    return result


@dataclass(frozen=True)
class ActivationSpec:
    """Where one activation annotation goes: a module's output, or element `index` of it."""

    module: str
    index: int | None
    spec: PartitionSpec
    pattern: str


_OUTPUT_INDEX = re.compile(r"^(?P<pattern>.*?)(\[(?P<index>\d+)\])?$")


def plan_activation_specs(
    model: nn.Module, cfg: ShardingConfig, key: str = "model.sharding.activations"
) -> list[ActivationSpec]:
    """The module outputs to annotate, after checking every pattern matches a module."""
    modules = [name for name, _ in model.named_modules() if name]
    plans: list[ActivationSpec] = []
    found = Problems()
    for raw_pattern, raw in cfg.activations.items():
        found.attempt(_plan_activation, raw_pattern, raw, modules, plans, key)
    found.raise_if_any()
    return plans


def _plan_activation(
    raw_pattern: str, raw: Any, modules: list[str], plans: list[ActivationSpec], key: str
) -> None:
    where = f"{key}[{raw_pattern!r}]"
    parts = _OUTPUT_INDEX.match(raw_pattern)
    pattern, index = parts["pattern"], parts["index"]
    spec = parse_spec(raw, where)
    for name in _matching(pattern, modules, where, "module"):
        plans.append(ActivationSpec(name, None if index is None else int(index), spec, raw_pattern))


def shard_activations(
    model: nn.Module, plans: list[ActivationSpec], mesh: Mesh, backend: Backend
) -> list[Any]:
    """Annotate the planned module outputs at every forward pass (forward hooks); returns the
    hook handles. The checks that need the output's shape run at the first (traced) pass."""
    modules = dict(model.named_modules())
    handles = []
    for plan in plans:
        handles.append(
            modules[plan.module].register_forward_hook(_output_hook(plan, mesh, backend))
        )
    return handles


def _output_hook(plan: ActivationSpec, mesh: Mesh, backend: Backend):
    where = f"model.sharding.activations[{plan.pattern!r}]"

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if plan.index is None:
            return _annotate(output, plan, mesh, backend, where)
        if not isinstance(output, (tuple, list)) or plan.index >= len(output):
            raise ConfigError(
                f"{where}: {plan.module} returns {type(output).__name__}, not a tuple with an "
                f"element {plan.index}."
            )
        items = list(output)
        items[plan.index] = _annotate(items[plan.index], plan, mesh, backend, where)
        return type(output)(items)

    return hook


def _annotate(
    tensor: Any, plan: ActivationSpec, mesh: Mesh, backend: Backend, where: str
) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"{where}: the output of {plan.module} is {type(tensor).__name__}.")
    shape = tuple(tensor.shape)
    if len(shape) != len(plan.spec):
        raise ConfigError(
            f"{where}: spec has {len(plan.spec)} entries but the output of {plan.module} has "
            f"shape {list(shape)}."
        )
    for dim, (size, entry) in enumerate(zip(shape, plan.spec)):
        if size % mesh.size(entry):
            raise ConfigError(
                f"{where}: the output of {plan.module} has size {size} in dimension {dim}, "
                f"which {_show_entry(entry)} (mesh size {mesh.size(entry)}) does not divide."
            )
    return backend.shard_activation(tensor, mesh, plan.spec)


def replicated(specs: dict[str, PartitionSpec]) -> list[str]:
    """Names whose spec splits nothing."""
    return [name for name, spec in specs.items() if all(e is None for e in spec)]


def micro_batch_rows(global_batch_size: int, grad_accum_steps: int, mesh: Mesh, hosts: int) -> int:
    """The rows of one micro-batch on one host. The global batch must split into
    grad_accum_steps micro-batches, each over the data-parallel devices and over the hosts."""
    ways = mesh.size(BATCH_SPEC[0])
    parts = grad_accum_steps * ways
    if global_batch_size % parts or global_batch_size % (grad_accum_steps * hosts):
        multiple = parts if global_batch_size % parts else grad_accum_steps * hosts
        hosts_text = f" and {hosts} hosts" if hosts > 1 else ""
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} does not split into "
            f"trainer.grad_accum_steps={grad_accum_steps} micro-batches over the {ways} "
            f"data-parallel devices ({describe_batch_axes(mesh)}) of mesh {mesh.describe()}"
            f"{hosts_text}: it must be a multiple of {multiple}."
        )
    return global_batch_size // hosts // grad_accum_steps


def dispatch_spec(
    cfg: ShardingConfig, key: str = "model.sharding.dispatch"
) -> PartitionSpec | None:
    """The expert buffers' spec, its axes checked (None: not annotated)."""
    return None if cfg.dispatch is None else parse_spec(cfg.dispatch, key)


def qkv_spec(cfg: ShardingConfig, key: str = "model.sharding.qkv") -> PartitionSpec:
    """The Pallas kernels' q/k/v spec, checked: one entry per [batch, heads, sequence, dim]."""
    spec = parse_spec(cfg.qkv, key)
    if len(spec) != 4:
        raise ConfigError(
            f"{key}={list(cfg.qkv)}: a spec of [batch, heads, sequence, head_dim] has 4 entries."
        )
    return spec
