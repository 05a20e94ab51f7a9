"""What the sharding specs mean on the torch.distributed engine, checked without starting it.

The engine applies the same specs as XLA SPMD (configs/model/sharding/), by module:
- a dimension split over `fsdp` is FSDP2's shard dimension for that parameter (`fully_shard`
  per decoder layer and at the root gathers the weights for compute and reduce-scatters their
  gradients); with `data` > 1 the parameters are replicated over `data` (hybrid sharding);
- a dimension split over `tensor` makes its module tensor-parallel: a Linear weight split on its
  output dimension (0) is column-parallel, on its input dimension (1) row-parallel; an Embedding
  split on its embedding dimension (1) column-parallel, on its vocabulary (0) row-parallel;
- every other dimension is replicated.
So the per-device shapes are those of the plan (torchprime/plan.py) on both engines. A spec with
no such meaning (an axis the engine does not have, one dimension split over `tensor` and
another axis, `tensor` on a parameter that is not a Linear or Embedding weight, a parameter
left whole when FSDP shards its neighbours) is an error naming the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from torchprime.errors import ConfigError, Problems
from torchprime.mesh import Mesh, PartitionSpec
from torchprime.sharding import ShardingConfig, parse_spec, pattern_regex

#: Axes the engine splits parameters over (the others must be 1).
SUPPORTED = ("data", "fsdp", "tensor")


@dataclass(frozen=True)
class ParamLayout:
    fsdp_dim: int | None
    """The dimension FSDP2 shards over `fsdp` (None: no data-parallel sharding)."""
    tensor_dim: int | None
    """The dimension split over `tensor` (None: not tensor-parallel)."""


def data_parallel_sharded(mesh: Mesh) -> bool:
    """Whether FSDP2 wraps the model: some data-parallel axis has more than one device."""
    return mesh.shape["data"] * mesh.shape["fsdp"] > 1


def param_layout(name: str, spec: PartitionSpec, mesh: Mesh, module: nn.Module) -> ParamLayout:
    """The layout of parameter `name` (held by `module`) under `spec`; a ConfigError saying
    why when the spec has no meaning on the engine."""
    fsdp_dim = tensor_dim = None
    for dim, entry in enumerate(spec):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        used = [a for a in names if mesh.shape[a] > 1]  # a 1-device axis splits nothing
        if not used:
            continue
        if other := [a for a in used if a not in SUPPORTED]:
            raise ConfigError(
                f"{name}: the torch.distributed engine has no {other[0]} parallelism "
                f"({other[0]}={mesh.shape[other[0]]}); split over {', '.join(SUPPORTED)} only."
            )
        if "tensor" in used:
            if len(used) > 1:
                raise ConfigError(
                    f"{name}: dimension {dim} is split over tensor and {used[0]} together; on "
                    "the torch.distributed engine `tensor` splits a dimension alone."
                )
            if tensor_dim is not None:
                raise ConfigError(f"{name}: two dimensions are split over tensor.")
            _check_tensor_parallel(name, dim, module)
            tensor_dim = dim
            continue
        if "data" in used:
            raise ConfigError(
                f"{name}: dimension {dim} is split over data; the torch.distributed engine "
                "replicates parameters over `data` and shards them over `fsdp` (hybrid "
                "sharding): write `fsdp` for that dimension."
            )
        if fsdp_dim is not None:
            raise ConfigError(f"{name}: two dimensions are split over fsdp; FSDP2 shards one.")
        fsdp_dim = dim
    if fsdp_dim is None and mesh.shape["fsdp"] > 1:
        raise ConfigError(
            f"{name} is not split over fsdp: FSDP2 shards every parameter of a layer, so on "
            "the torch.distributed engine each one needs a dimension split over fsdp."
        )
    return ParamLayout(fsdp_dim, tensor_dim)


def _check_tensor_parallel(name: str, dim: int, module: nn.Module) -> None:
    if not (name.endswith(".weight") and isinstance(module, (nn.Linear, nn.Embedding))):
        raise ConfigError(
            f"{name}: tensor parallelism splits Linear and Embedding weights, not a "
            f"{type(module).__name__}'s parameter."
        )
    if getattr(module, "bias", None) is not None:
        raise ConfigError(f"{name}: tensor parallelism of a Linear with a bias is not supported.")


def layouts(
    model: nn.Module, specs: dict[str, PartitionSpec], mesh: Mesh
) -> dict[str, ParamLayout]:
    """Every parameter's layout (names as in `model.named_parameters()`)."""
    modules = dict(model.named_modules())
    return {
        name: param_layout(name, specs[name], mesh, modules[_owner(name)])
        for name, _ in model.named_parameters()
    }


def check_dtensor_specs(
    model: nn.Module,
    cfg: ShardingConfig,
    specs: dict[str, PartitionSpec],
    mesh: Mesh,
    key: str = "model.sharding.parameters",
) -> None:
    """Every pattern's specs have a meaning on the torch.distributed engine (each problem names
    its pattern), and so do the parameters no pattern matches (replicated)."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    found = Problems()
    matched: set[str] = set()
    for pattern, raw in cfg.parameters.items():
        where = f"{key}[{pattern!r}]"
        names = [n for n in params if pattern_regex(pattern).match(n)]
        matched.update(names)
        for name in names:  # the pattern's first problem, as for the other spec checks
            try:
                param_layout(name, parse_spec(raw, where), mesh, modules[_owner(name)])
            except ConfigError as e:
                found.append(f"{where}: {e}")
                break
    for name in params:
        if name not in matched:
            found.attempt(param_layout, name, specs[name], mesh, modules[_owner(name)])
    tied = [n for n, p in params.items() if id(p) in _shared_ids(params)]
    found.check(
        not tied or mesh.shape["tensor"] == 1,
        f"{key}: {' and '.join(tied)} are one tied tensor; tensor parallelism of tied weights "
        "is not supported on the torch.distributed engine.",
    )
    found.raise_if_any()


def _shared_ids(params: dict[str, nn.Parameter]) -> set[int]:
    seen: dict[int, int] = {}
    for p in params.values():
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _owner(name: str) -> str:
    """The module holding parameter `name`."""
    return name.rpartition(".")[0]
