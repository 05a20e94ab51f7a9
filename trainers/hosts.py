"""How the hosts of a job agree: through a torch.distributed process group when there is one
(several hosts), trivially when the job is one process."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from torchprime.backend.base import Backend


def process_index(backend: Backend) -> int:
    """This host's index: its rank when hosts share a process group."""
    return dist.get_rank() if dist.is_initialized() else backend.process_index


def process_total() -> int:
    """Processes in the job's process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_coordinator() -> bool:
    """Whether this process seals checkpoints and edits shared files (rank 0; single process:
    always). Hosts coordinate through torch.distributed when a process group is up."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_from_hosts(value: Any) -> list[Any]:
    """`value` of every host, in rank order, on every host."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_from_coordinator(value: Any) -> Any:
    """The coordinator's `value`, on every host (a barrier too)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_host(flag: bool) -> bool:
    """Whether `flag` is true on any host (every host gets the same answer)."""
    return any(gather_from_hosts(bool(flag)))
