"""torch_xla SPMD: the only module of the project that imports torch_xla.

Import it through `torchprime.backend.select_backend`, which sets PJRT_DEVICE and, for
virtual CPU devices, CPU_NUM_DEVICES first: torch_xla reads both once, when it is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.distributed.parallel_loader as pl
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr

from torchprime.backend.base import Backend
from torchprime.mesh import Mesh, PartitionSpec


class XlaBackend(Backend):
    """SPMD over every device of every host: one program, tensors sharded by annotation."""

    name = "xla"
    is_xla = True

    def __init__(self):
        # SPMD must be on before the first XLA tensor exists: from then on the runtime shows
        # one virtual device per host and shards tensors by their annotations.
        if not xr.is_spmd():
            xr.use_spmd()
        self._device = torch_xla.device()
        # Start the runtime now: torch's autograd engine sizes its device queues at the first
        # backward pass, from the XLA device count at that moment, which is 0 until the runtime
        # is up. A backward pass before that (on the CPU, or on a lazy XLA tensor) would make
        # every later XLA backward fail an internal assert.
        xr.global_runtime_device_count()
        self._meshes: dict[Mesh, xs.Mesh] = {}
        self._stacked_steps: dict[torch.nn.Module, Any] = {}  # scan_stacked's step functions
        if xr.process_count() > 1 and not torch.distributed.is_initialized():
            # Hosts agree through a CPU process group: checkpoints (one plan, one metadata
            # file, one coordinator sealing the folder), resume, barriers. Untested here: a
            # CPU machine runs one process.
            from torch_xla.distributed import xla_backend  # noqa: F401 (registers xla://)

            torch.distributed.init_process_group("gloo", init_method="xla://")

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def device_kind(self) -> str:
        kind = xr.device_type()
        if kind == "TPU":
            from torch_xla._internal import tpu

            # "v5litepod-8" → "TPU v5e", "v5p-128" → "TPU v5p": v5e and v5p differ 2x in peak.
            kind = tpu.get_tpu_type().replace("v5litepod", "v5e")
            return f"TPU {kind}"
        return kind

    @property
    def device_count(self) -> int:
        return xr.global_runtime_device_count()

    @property
    def process_index(self) -> int:
        return xr.process_index()

    @property
    def process_count(self) -> int:
        return xr.process_count()

    def xla_mesh(self, mesh: Mesh) -> xs.Mesh:
        """The torch_xla mesh for `mesh`; a hybrid (ici x dcn) mesh when it spans slices."""
        if mesh not in self._meshes:
            if mesh.num_slices > 1:
                xla_mesh = xs.HybridMesh(
                    ici_mesh_shape=mesh.ici, dcn_mesh_shape=mesh.dcn, axis_names=mesh.axis_names
                )
            else:
                ids = np.arange(mesh.num_devices)
                xla_mesh = xs.Mesh(ids, tuple(mesh.shape.values()), mesh.axis_names)
            xs.set_global_mesh(xla_mesh)
            self._meshes[mesh] = xla_mesh
        return self._meshes[mesh]

    def place(self, host_tensor: torch.Tensor, mesh: Mesh, spec: PartitionSpec) -> torch.Tensor:
        if all(entry is None for entry in spec):
            return host_tensor.to(self._device)
        sharding = xs.ShardingSpec(self.xla_mesh(mesh), spec)
        try:
            return xm.send_cpu_data_to_device([host_tensor], self._device, sharding)[0]
        except IndexError as e:
            # torch_xla 2.9 cannot cut host shards when the last tiled dimension is split and
            # nothing is replicated (e.g. [fsdp] on a vector, [tensor, fsdp] on a matrix):
            # "too many indices". Send that tensor whole and shard it on the device instead.
            if "too many indices" not in str(e):
                raise
            tensor = host_tensor.to(self._device)
            xs.mark_sharding(tensor, self.xla_mesh(mesh), spec)
            return tensor

    def mark_sharding(self, tensor: torch.Tensor, mesh: Mesh, spec: PartitionSpec) -> None:
        xs.mark_sharding(tensor, self.xla_mesh(mesh), spec)

    def shard_activation(
        self, tensor: torch.Tensor, mesh: Mesh, spec: PartitionSpec
    ) -> torch.Tensor:
        return xs.mark_sharding_with_gradients(tensor, self.xla_mesh(mesh), spec)

    def sharding_of(self, tensor: torch.Tensor) -> str | None:
        return torch_xla._XLAC._get_xla_sharding_spec(tensor) or None

    def sync(self) -> None:
        torch_xla.sync()

    def wait_device_ops(self) -> None:
        xm.wait_device_ops()

    def add_step_closure(self, fn: Callable[..., None], args: Sequence[Any] = ()) -> None:
        xm.add_step_closure(fn, args=tuple(args))

    def compile_count(self) -> int:
        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def device_loader(
        self, batches: Iterable[dict[str, torch.Tensor]], mesh: Mesh, batch_spec: PartitionSpec
    ) -> Iterator[dict[str, torch.Tensor]]:
        # Each host feeds its own part of the global batch; `minibatch` tells torch_xla so, and
        # it assembles the global array across hosts. torch_xla 2.9 cannot cut host shards
        # whose last dimension is split with nothing replicated ("too many indices"), as the
        # sequence over `context` is: rows [B, T] are sent as [B, N, T / N] split on the middle
        # dimension and viewed as [B, T] on the device, where that split is the sequence's.
        split = mesh.size(batch_spec[-1])
        if split == 1:
            whole_last = (*batch_spec[:-1], None)  # a 1-device axis named there trips it too
            sharding = xs.ShardingSpec(
                self.xla_mesh(mesh), whole_last, minibatch=self.process_count > 1
            )
            return iter(pl.MpDeviceLoader(batches, self._device, input_sharding=sharding))
        sharding = xs.ShardingSpec(
            self.xla_mesh(mesh), (*batch_spec, None), minibatch=self.process_count > 1
        )
        folded = ({k: _fold_last(v, split) for k, v in b.items()} for b in batches)
        loaded = pl.MpDeviceLoader(folded, self._device, input_sharding=sharding)
        return ({k: self._unfold_last(v, mesh, batch_spec) for k, v in b.items()} for b in loaded)

    def _unfold_last(self, t: torch.Tensor, mesh: Mesh, spec: PartitionSpec) -> torch.Tensor:
        t = t.flatten(-2)
        xs.mark_sharding(t, self.xla_mesh(mesh), spec)
        return t

    def checkpoint_planners(self) -> tuple[Any, Any]:
        # Sharded XLA tensors are saved shard by shard by these planners, and can be loaded
        # onto another mesh.
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

        from torchprime.backend.xla_planners import SavePlanner

        return SavePlanner(), SPMDLoadPlanner()

    def shard_like(self, tensor: torch.Tensor, like: torch.Tensor) -> None:
        sharding = torch_xla._XLAC._get_xla_op_sharding(like)
        if sharding is not None:
            torch_xla._XLAC._xla_mark_sharding(tensor, sharding)

    def stage_for_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        # Each sharded tensor as this process's shards (torch_xla's _CpuShards, which its
        # save planner, checkpoint_planners()[0], writes shard by shard), the others
        # whole, in batched transfers of tensors that hold data (the caller synced): no graph
        # and no compilation, where a whole copy of a sharded tensor compiles a gather each.
        from torch.utils._pytree import tree_map
        from torch_xla.experimental.distributed_checkpoint._helpers import (
            _sharded_cpu_state_dict,
        )

        plain = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, state)
        return _sharded_cpu_state_dict(plain)

    def rng_state(self) -> int:
        return xm.get_rng_state()

    def set_rng_state(self, state: Any) -> None:
        xm.set_rng_state(int(state))

    def checkpoint(self, fn: Callable[..., Any], *args: Any) -> Any:
        from torch_xla.utils.checkpoint import checkpoint

        return checkpoint(fn, *args)

    def start_trace(self, directory: Path) -> None:
        import torch_xla.debug.profiler as xp

        xp.start_trace(str(directory))

    def stop_trace(self, directory: Path) -> None:
        import torch_xla.debug.profiler as xp

        xp.stop_trace()

    def metrics_report(self) -> str | None:
        return met.metrics_report()

    @property
    def supports_host_offload(self) -> bool:
        return self.device_kind.startswith("TPU")

    def scan_layers(
        self,
        layers: Sequence[torch.nn.Module],
        carry: tuple,
        remat: bool,
        pure: bool,
        offloaded: frozenset[str] = frozenset(),
    ) -> tuple:
        # One layer is traced and compiled; the others reuse it with their own weights.
        from torch_xla.experimental.scan_layers import scan_layers

        partition = self._scan_partition(remat, offloaded)
        return scan_layers(layers, carry, partition_fn=partition, is_layer_pure=pure)

    def _scan_partition(self, remat: bool, offloaded: frozenset[str]):
        """How a scan splits its layer's graph between forward and backward: with remat, the
        min-cut partitioner recomputes what the backward needs instead of saving every
        activation of every layer; with offload, only the marked activations are saved, on
        the host."""
        from functorch.compile import default_partition, min_cut_rematerialization_partition

        if offloaded:
            return self.offload_partition(offloaded)
        return min_cut_rematerialization_partition if remat else default_partition

    def scan_stacked(
        self,
        step: torch.nn.Module,
        carry: tuple,
        weights: dict[str, torch.Tensor],
        remat: bool,
        pure: bool,
        offloaded: frozenset[str] = frozenset(),
    ) -> tuple:
        # torch_xla's scan with the stacked weights as its xs: each iteration gets slice i of
        # every weight and binds it into the step module; nothing is stacked or split here.
        # The step function is kept per module, so a pure scan finds its traced graphs again.
        from torch_xla.experimental.scan import scan

        partition = self._scan_partition(remat, offloaded)
        fn = self._stacked_steps.get(step)
        if fn is None:

            def fn(c: tuple, w: dict[str, torch.Tensor]) -> tuple[tuple, None]:
                return torch.func.functional_call(step, w, c, strict=True), None

            self._stacked_steps[step] = fn
        return scan(fn, carry, weights, partition_fn=partition, is_fn_pure=pure)[0]

    def offload_partition(self, names: frozenset[str]):
        """The scan partition function that keeps the activations marked `names` on the host."""
        import torch_xla.experimental.stablehlo_custom_call  # noqa: F401 (registers the ops)

        from torchprime.offload import offload_partition

        return offload_partition(
            names, torch.ops.xla.place_to_host.default, torch.ops.xla.place_to_device.default
        )

    def add_backward_barrier(self, module: torch.nn.Module) -> None:
        from torch_xla.distributed.spmd.xla_sharding import apply_backward_optimization_barrier

        apply_backward_optimization_barrier(module)

    def patch_linear(self, model: torch.nn.Module) -> None:
        from torch_xla.distributed.spmd.xla_sharding import apply_xla_patch_to_nn_linear

        apply_xla_patch_to_nn_linear(model)

    def graph_text(self, tensors: list[torch.Tensor]) -> str:
        return torch_xla._XLAC._get_xla_tensors_hlo(tensors)

    def compile_seconds(self) -> float:
        data = met.metric_data("CompileTime")
        return data[1] / 1e9 if data else 0.0  # the runtime keeps nanoseconds

    def graph_hash(self, tensors: list[torch.Tensor]) -> bytes:
        return torch_xla._XLAC._get_graph_hash(tensors)

    def optimization_barrier_(self, tensors: list[torch.Tensor]) -> None:
        xm.optimization_barrier_(tensors)


def _fold_last(t: torch.Tensor, parts: int) -> torch.Tensor:
    """[..., T] → [..., parts, T / parts] (see XlaBackend.device_loader)."""
    return t.unflatten(-1, (parts, t.shape[-1] // parts))
