"""The interface every backend implements: all the rest of the code knows of devices.

A backend answers the same questions on XLA and on plain PyTorch; on plain PyTorch most
answers are trivial (one device, nothing to shard, nothing to compile), so the training code
takes one path on both.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchprime.mesh import Mesh, PartitionSpec


class Backend(abc.ABC):
    #: Short name, as in the config's `backend` key: "xla", "cpu" or "cuda".
    name: str
    #: True when tensors are lazy XLA tensors, so a step is traced, compiled and run as one graph.
    is_xla: bool

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device model, optimizer state and batches live on."""

    @property
    @abc.abstractmethod
    def device_kind(self) -> str:
        """What the devices are, for humans and tables of peak FLOP/s (e.g. "TPU v5p", "CPU")."""

    @property
    @abc.abstractmethod
    def device_count(self) -> int:
        """Devices the mesh spans (all hosts). One on eager backends."""

    @property
    def process_index(self) -> int:
        """This host's index among `process_count` hosts."""
        return 0

    @property
    def process_count(self) -> int:
        """Hosts in the job, each reading its own part of the data."""
        return 1

    @abc.abstractmethod
    def place(self, host_tensor: torch.Tensor, mesh: Mesh, spec: PartitionSpec) -> torch.Tensor:
        """A CPU tensor sent to the device laid out by `spec`; each device gets only its shard."""

    @abc.abstractmethod
    def mark_sharding(self, tensor: torch.Tensor, mesh: Mesh, spec: PartitionSpec) -> None:
        """Shard `tensor` over `mesh` following `spec` (one entry per dimension)."""

    def shard_activation(
        self, tensor: torch.Tensor, mesh: Mesh, spec: PartitionSpec
    ) -> torch.Tensor:
        """`tensor` annotated with `spec`, and its gradient too in the backward pass. Not in
        place: use the returned tensor. Identity where nothing is sharded."""
        return tensor

    def sharding_of(self, tensor: torch.Tensor) -> str | None:
        """The sharding the runtime holds for `tensor`, as its own text; None when unsharded."""
        return None

    @abc.abstractmethod
    def sync(self) -> None:
        """End of a training step: on XLA, cut the traced graph and launch it."""

    @abc.abstractmethod
    def wait_device_ops(self) -> None:
        """Block until every launched device computation has finished."""

    @abc.abstractmethod
    def add_step_closure(self, fn: Callable[..., None], args: Sequence[Any] = ()) -> None:
        """Run `fn(*args)` once the current step's tensors hold values.

        On XLA this runs after the next `sync()`, so reading a tensor (`.item()`) does not
        force an extra graph execution; on eager it runs at once.
        """

    def compile_count(self) -> int | None:
        """Graph compilations so far in this process; None where nothing is compiled."""
        return None

    @abc.abstractmethod
    def device_loader(
        self, batches: Iterable[dict[str, torch.Tensor]], mesh: Mesh, batch_spec: PartitionSpec
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Move host batches to the device, sharding their batch dimension by `batch_spec`."""

    def optimization_barrier_(self, tensors: list[torch.Tensor]) -> None:
        """Keep the compiler from moving computation across this point (XLA only)."""

    def checkpoint_planners(self) -> tuple[Any, Any]:
        """(save planner, load planner) for torch.distributed.checkpoint; None: its defaults."""
        return None, None

    def shard_like(self, tensor: torch.Tensor, like: torch.Tensor) -> None:
        """Lay `tensor` out as `like` is (same shape): optimizer moments like their parameter."""

    # -- the model's layout and its gradients; the defaults suit one program over all devices
    #    (XLA SPMD) and one device (eager) -----------------------------------------------------
    def parallelize(
        self, model: torch.nn.Module, specs: dict[str, PartitionSpec], mesh: Mesh
    ) -> None:
        """Lay out the meta model's modules by `specs` before its weights exist (the
        torch.distributed engine: tensor parallelism, then FSDP2 per decoder layer and at the
        root). Nothing by default: XLA shards each tensor as it is placed."""

    def place_parameter(
        self, param: torch.nn.Parameter, host: torch.Tensor, mesh: Mesh, spec: PartitionSpec
    ) -> torch.nn.Parameter:
        """The parameter that replaces `param` (the module's, still without values) holding the
        whole host tensor `host` laid out by `spec`; each device gets only its shard."""
        return torch.nn.Parameter(
            self.place(host.detach(), mesh, spec), requires_grad=host.requires_grad
        )

    #: Each process computes the loss of its own rows of the batch (one process per device), so
    #: losses, token counts and gradients are sums over processes (`sum_over_data`).
    local_batch = False

    def sum_over_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes that hold different rows of the batch (every
        process gets the sum). Identity where one program sees the whole batch."""
        return tensor

    def set_gradient_sync(self, model: torch.nn.Module, enabled: bool) -> None:
        """Whether the next backward pass reduces gradients across processes (off for the
        micro-batches before the last one of a step). Nothing to do where nothing is reduced."""

    def total_norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The 2-norm of all `tensors` together, as one tensor (sharded ones counted once)."""
        return torch.nn.utils.get_total_norm(tensors)

    def clip_grads_with_norm_(
        self, params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor
    ) -> None:
        """Scale the gradients of `params` by max_norm / total_norm where that is below 1."""
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole of `tensor` in host memory. Where tensors are split over processes every
        process must call it (it gathers)."""
        return tensor.detach().cpu()

    def stage_for_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of `state` (nested dicts of tensors) in host memory that nothing else writes
        to, for a checkpoint written while training goes on; DCP's default planner saves it."""
        flat, spec = tree_flatten(state)
        flat = [t.detach().to("cpu", copy=True) if torch.is_tensor(t) else t for t in flat]
        return tree_unflatten(flat, spec)

    def rng_state(self) -> Any:
        """The device RNG's state as a JSON value, for checkpoints; None where torch's CPU RNG
        is the only one."""
        return None

    def set_rng_state(self, state: Any) -> None:
        """Restore what `rng_state` returned."""

    # -- model rewriting (torchprime.rewriting); the defaults are plain PyTorch ---------------
    def checkpoint(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, its activations recomputed in backward instead of kept."""
        import torch.utils.checkpoint

        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    def start_trace(self, directory: Path) -> None:
        """Start a profiler trace (written to `directory` by stop_trace)."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self._profiler.start()

    def stop_trace(self, directory: Path) -> None:
        self._profiler.stop()
        self._profiler.export_chrome_trace(str(directory / "trace.json"))
        self._profiler = None

    def metrics_report(self) -> str | None:
        """The runtime's counters and timings as text (XLA's metrics report); None elsewhere."""
        return None

    supports_host_offload = False
    """Whether activations can live in host memory between forward and backward (TPU)."""

    def scan_layers(
        self,
        layers: Sequence[torch.nn.Module],
        carry: tuple,
        remat: bool,
        pure: bool,
        offloaded: frozenset[str] = frozenset(),
    ) -> tuple:
        """Apply identical `layers` in turn to `carry` (each returns the next carry). Eager:
        a loop; `remat` checkpoints each layer; `pure` matters only where tracing is cached;
        `offloaded` names the marked activations kept on the host (torchprime.offload)."""
        for layer in layers:
            carry = self.checkpoint(layer, *carry) if remat else layer(*carry)
        return carry

    def scan_stacked(
        self,
        step: torch.nn.Module,
        carry: tuple,
        weights: dict[str, torch.Tensor],
        remat: bool,
        pure: bool,
        offloaded: frozenset[str] = frozenset(),
    ) -> tuple:
        """Apply `step` once per slice i of the stacked `weights` ([layers, ...] tensors named
        as `step`'s parameters), slice i bound as its parameters, to `carry` (each call returns
        the next carry). Eager: a loop; the arguments mean what they mean for `scan_layers`."""
        for i in range(next(iter(weights.values())).shape[0]):
            sliced = {name: w[i] for name, w in weights.items()}
            carry = (
                self.checkpoint(_call_with, step, sliced, *carry)
                if remat
                else _call_with(step, sliced, *carry)
            )
        return carry

    def add_backward_barrier(self, module: torch.nn.Module) -> None:
        """Keep the compiler from fusing `module`'s backward with its neighbours' (XLA only)."""

    def patch_linear(self, model: torch.nn.Module) -> None:
        """Replace nn.Linear by a form that keeps activation sharding (XLA only)."""

    def graph_text(self, tensors: list[torch.Tensor]) -> str:
        """The compiler's program computing `tensors` (XLA: HLO text); empty where none."""
        return ""

    def compile_seconds(self) -> float:
        """Seconds spent compiling graphs so far in this process (0 where nothing compiles)."""
        return 0.0

    def graph_hash(self, tensors: list[torch.Tensor]) -> bytes:
        """A fingerprint of the graph computing `tensors` (XLA); empty where nothing is traced."""
        return b""

    def describe(self) -> str:
        return f"{self.name} ({self.device_count} x {self.device_kind})"


def _call_with(module: torch.nn.Module, weights: dict[str, torch.Tensor], *args: Any) -> Any:
    """`module(*args)` with `weights` standing in for its parameters of those names."""
    return torch.func.functional_call(module, weights, args, strict=True)
