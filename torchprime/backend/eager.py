"""Plain PyTorch on one CPU or CUDA device: the same calls as XLA, with trivial answers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from torchprime.backend.base import Backend
from torchprime.mesh import Mesh, PartitionSpec


class EagerBackend(Backend):
    """One device, nothing sharded: the mesh describes the target run and is validated only."""

    is_xla = False

    def __init__(self, name: str):
        if name not in ("cpu", "cuda"):
            raise ValueError(f"eager backends are cpu and cuda, not {name!r}")
        self.name = name
        self._device = (
            torch.device("cuda", torch.cuda.current_device())
            if name == "cuda"
            else (torch.device("cpu"))
        )

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def device_kind(self) -> str:
        if self.name == "cuda":
            return torch.cuda.get_device_name(self._device)
        return "CPU"

    @property
    def device_count(self) -> int:
        return 1

    def place(self, host_tensor: torch.Tensor, mesh: Mesh, spec: PartitionSpec) -> torch.Tensor:
        return host_tensor.to(self._device)

    def mark_sharding(self, tensor: torch.Tensor, mesh: Mesh, spec: PartitionSpec) -> None:
        pass  # a single device holds every tensor whole

    def sync(self) -> None:
        pass  # eager ops already ran

    def wait_device_ops(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize(self._device)

    def add_step_closure(self, fn: Callable[..., None], args: Sequence[Any] = ()) -> None:
        fn(*args)

    def device_loader(
        self, batches: Iterable[dict[str, torch.Tensor]], mesh: Mesh, batch_spec: PartitionSpec
    ) -> Iterator[dict[str, torch.Tensor]]:
        non_blocking = self.name == "cuda"
        for batch in batches:
            yield {k: v.to(self._device, non_blocking=non_blocking) for k, v in batch.items()}
