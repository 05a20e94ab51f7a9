"""torch.distributed: one process per device, started by torchrun (gloo on CPUs, NCCL on GPUs).

The only module of the project that imports torch.distributed's parallel APIs (DeviceMesh,
DTensor, FSDP2's `fully_shard`, tensor parallelism). The config's mesh becomes a DeviceMesh with
the same axis names, each process one device of it (torchprime.mesh.device_grid); the sharding
specs become placements as torchprime/dtensor_layout.py says: tensor parallelism first, by
module, then FSDP2 on every decoder layer and on the root. Both are applied to the meta model,
before the weights exist, so each device only ever holds its shards.

A host here is a machine (torchrun's node): it reads its part of the global batch, as an XLA
host does, and each of its processes keeps the rows of the devices it is
(`device_loader`). One process per device computes the loss of its own rows; the trainer sums
losses, token counts and gradients over processes (`local_batch`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from torchprime.backend.eager import EagerBackend
from torchprime.dtensor_layout import ParamLayout, data_parallel_sharded, layouts
from torchprime.errors import ConfigError
from torchprime.mesh import AXES, Mesh, PartitionSpec, data_parallel_index, device_grid


def start_process_group(name: str, device: torch.device) -> None:
    """Join the job's process group (rank, world size and rendezvous from torchrun's
    environment); a ConfigError saying why when it cannot start."""
    kind = "nccl" if name == "cuda" else "gloo"
    try:
        dist.init_process_group(kind, device_id=device if name == "cuda" else None)
    except Exception as e:  # noqa: BLE001 - the rendezvous raises anything from its store
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"backend={name}: the {kind} process group could not start ({type(e).__name__}: "
            f"{first}). Start one process per device with torchrun, which sets RANK, "
            f"WORLD_SIZE, MASTER_ADDR and MASTER_PORT: torchrun --nproc_per_node=N train.py "
            f"backend={name} ..."
        ) from None


class DistributedBackend(EagerBackend):
    """One device per process, eager as on one device; the mesh spans every process."""

    local_batch = True

    def __init__(self, name: str):
        if name not in ("cpu", "cuda"):
            raise ValueError(f"the torch.distributed engine runs on cpu or cuda, not {name!r}")
        if name == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        super().__init__(name)
        if not dist.is_initialized():
            start_process_group(name, self.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        self._meshes: dict[Mesh, DeviceMesh] = {}
        self._mesh: Mesh | None = None  # the model's, once laid out

    @property
    def device_count(self) -> int:
        return self.world_size

    @property
    def process_index(self) -> int:
        """This host's (torchrun node's) index: its processes have consecutive ranks."""
        return self.rank // self.local_processes

    @property
    def process_count(self) -> int:
        return max(1, self.world_size // self.local_processes)

    def describe(self) -> str:
        kind = "NCCL" if self.name == "cuda" else "gloo"
        return (
            f"torch.distributed {kind}, rank {self.rank} of {self.world_size} x {self.device_kind}"
        )

    # -- the mesh ---------------------------------------------------------------------------
    def device_mesh(self, mesh: Mesh) -> DeviceMesh:
        """The DeviceMesh of `mesh`: the same axis names and sizes, ranks as device_grid
        lays them out."""
        if mesh not in self._meshes:
            grid = torch.tensor(device_grid(mesh)).reshape(tuple(mesh.shape.values()))
            self._meshes[mesh] = DeviceMesh(self.device.type, grid, mesh_dim_names=AXES)
        return self._meshes[mesh]

    def _data_mesh(self, mesh: Mesh) -> DeviceMesh:
        """FSDP2's mesh: `fsdp`, with `data` before it for hybrid sharding."""
        device_mesh = self.device_mesh(mesh)
        return device_mesh["data", "fsdp"] if mesh.shape["data"] > 1 else device_mesh["fsdp"]

    # -- the model --------------------------------------------------------------------------
    def parallelize(self, model: nn.Module, specs: dict[str, PartitionSpec], mesh: Mesh) -> None:
        found = layouts(model, specs, mesh)
        if mesh.shape["tensor"] > 1:
            plan = tensor_parallel_plan(model, found)
            parallelize_module(model, self.device_mesh(mesh)["tensor"], plan)
        if data_parallel_sharded(mesh):
            self._fully_shard(model, found, mesh)
        self._mesh = mesh

    def _fully_shard(self, model: nn.Module, found: dict[str, ParamLayout], mesh: Mesh) -> None:
        dims = {p: found[name].fsdp_dim for name, p in model.named_parameters()}

        def placement(param: nn.Parameter) -> Shard:
            return Shard(dims.get(param) or 0)

        data_mesh = self._data_mesh(mesh)
        for layer in model.decoder_layers:
            fully_shard(layer, mesh=data_mesh, shard_placement_fn=placement)
        # The root: the embedding, the final norm and the LM head. Its weights stay gathered
        # after the forward pass: the backward needs the head at once.
        fully_shard(
            model, mesh=data_mesh, shard_placement_fn=placement, reshard_after_forward=False
        )
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # fully_shard gives the module a subclass named FSDP<class>; the model keeps
                # its class names, by which the rewriting finds layers (model.remat).
                cls = type(module)
                base = next(b for b in cls.__bases__ if b is not FSDPModule)
                cls.__name__, cls.__qualname__ = base.__name__, base.__qualname__
                # Gradients are summed over processes, each weighted by its share of the
                # batch's tokens (the trainer divides by the global count).
                module.set_gradient_divide_factor(1.0)
                # Plain sums on the wire (gloo has no pre-multiplied sum).
                module.set_force_sum_reduction_for_comms(True)
        model.to_empty(device=self.device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()

    def place_parameter(
        self, param: nn.Parameter, host: torch.Tensor, mesh: Mesh, spec: PartitionSpec
    ) -> nn.Parameter:
        if not isinstance(param, DTensor):
            return nn.Parameter(host.detach().to(self.device), requires_grad=host.requires_grad)
        if param.device.type == "meta":  # tensor-parallel only: nothing allocated it yet
            local = distribute_local(host.to(self.device), param)
            return nn.Parameter(
                DTensor.from_local(
                    local,
                    param.device_mesh,
                    param.placements,
                    shape=param.shape,
                    stride=param.stride(),
                ),
                requires_grad=host.requires_grad,
            )
        with torch.no_grad():
            param.to_local().copy_(distribute_local(host, param))
        return param

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(enabled)

    # -- values across processes --------------------------------------------------------------
    def sum_over_data(self, tensor: torch.Tensor) -> torch.Tensor:
        mesh = self._mesh
        if mesh is None or not data_parallel_sharded(mesh):
            return tensor
        device_mesh = self.device_mesh(mesh)["data", "fsdp"]
        partial = DTensor.from_local(tensor, device_mesh, [Partial(), Partial()])
        return partial.full_tensor()

    def total_norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Each process adds the squares of its shards, a tensor replicated over n processes
        weighing 1/n, then one all-reduce over every process gives the global sum."""
        local = torch.zeros((), dtype=torch.float32, device=self.device)
        for t in tensors:
            part = t.to_local() if isinstance(t, DTensor) else t
            square = part.float().pow(2).sum()
            local = local + square / self._replicas(t)
        if self.world_size > 1:
            dist.all_reduce(local)
        return local.sqrt()

    def _replicas(self, tensor: torch.Tensor) -> int:
        if not isinstance(tensor, DTensor):
            return self.world_size
        split = 1
        for size, placement in zip(tensor.device_mesh.shape, tensor.placements):
            if isinstance(placement, Shard):
                split *= size
        return self.world_size // split

    def clip_grads_with_norm_(
        self, params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor
    ) -> None:
        # torch's clipping scales every gradient in one call, which DTensors on different
        # meshes (tensor-parallel and FSDP-only modules) cannot share: one call per mesh.
        by_mesh: dict[int, list[torch.Tensor]] = {}
        for p in params:
            by_mesh.setdefault(id(getattr(p, "device_mesh", None)), []).append(p)
        for same in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(same, max_norm, total_norm)

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        return tensor.detach().cpu()

    # -- batches ------------------------------------------------------------------------
    def device_loader(
        self, batches: Iterable[dict[str, torch.Tensor]], mesh: Mesh, batch_spec: PartitionSpec
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This process's rows of each host batch: the rows of its data-parallel index among
        the host's (tensor-parallel peers get the same rows)."""
        share = data_parallel_index(mesh, self.rank)
        ways = mesh.size(batch_spec[0])
        per_host = ways // self.process_count
        first_of_host = self.process_index * per_host
        non_blocking = self.name == "cuda"
        for batch in batches:
            rows = next(iter(batch.values())).shape[0] // per_host
            start = (share - first_of_host) * rows
            yield {
                k: v[start : start + rows].to(self.device, non_blocking=non_blocking)
                for k, v in batch.items()
            }


def distribute_local(host: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This process's shard of the whole tensor `host`, laid out as `like`."""
    shape, offset = compute_local_shape_and_global_offset(
        like.shape, like.device_mesh, like.placements
    )
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return host[index]


def tensor_parallel_plan(
    model: nn.Module, found: dict[str, ParamLayout]
) -> dict[str, ParallelStyle]:
    """The parallel style of each module whose weight is split over `tensor`.

    A column-parallel Linear keeps its output split when a row-parallel sibling (same parent
    module) consumes it: attention's q/k/v → o, the MLP's gate/up → down (Megatron's pairs, one
    reduction per block). Otherwise its output is gathered, and a row-parallel Linear without a
    column-parallel sibling splits its whole input itself."""
    modules = dict(model.named_modules())
    split = {
        name.rpartition(".")[0]: layout.tensor_dim
        for name, layout in found.items()
        if layout.tensor_dim is not None
    }

    def sibling_split(name: str, dim: int) -> bool:
        parent = name.rpartition(".")[0]
        return any(
            d == dim and n.rpartition(".")[0] == parent and isinstance(modules[n], nn.Linear)
            for n, d in split.items()
            if n != name
        )

    plan: dict[str, ParallelStyle] = {}
    for name, dim in split.items():
        if isinstance(modules[name], nn.Embedding):
            plan[name] = (
                ColwiseParallel(output_layouts=Replicate())
                if dim == 1
                else RowwiseParallel(input_layouts=Replicate())
            )
        elif dim == 0:
            paired = sibling_split(name, 1)
            plan[name] = (
                ColwiseParallel() if paired else ColwiseParallel(output_layouts=Replicate())
            )
        else:
            paired = sibling_split(name, 0)
            plan[name] = RowwiseParallel() if paired else RowwiseParallel(input_layouts=Replicate())
    return plan
