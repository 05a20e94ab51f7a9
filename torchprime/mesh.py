"""The logical device mesh: named axes, their sizes, and the checks that make them usable.

A mesh here is pure data (names and sizes). The XLA backend turns it into a torch_xla mesh;
the sharding plan and validation use it as is, so both work without any accelerator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torchprime.errors import ConfigError, Problems

#: Mesh axes in the order devices are laid out (the last varies fastest, so it is the one whose
#: devices are nearest each other: tensor and context parallelism want the fastest links).
AXES = ("data", "fsdp", "expert", "tensor", "context")

#: The axes the batch is split over, outermost first. `expert` is one of them: outside the
#: mixture-of-experts layers an expert-parallel device works on rows of its own like any
#: data-parallel one, and inside them its rows' tokens travel to the devices holding their
#: experts (torchprime/experts.py). A 1-device axis changes nothing.
BATCH_AXES = ("data", "fsdp", "expert")

#: One entry of a partition spec: a mesh axis, several axes, or None (not sharded).
SpecEntry = str | tuple[str, ...] | None
PartitionSpec = tuple[SpecEntry, ...]


def axes_of(entry: SpecEntry) -> tuple[str, ...]:
    """The mesh axes a partition spec entry splits a dimension over."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


@dataclass
class MeshAxesConfig:
    """Devices along each mesh axis. The product over `ici_mesh` × `dcn_mesh` must equal the
    device count. One axis per mesh may be -1: it takes whatever devices the others leave."""

    data: int = 1
    """Data parallelism: parameters replicated, the batch split."""
    fsdp: int = 1
    """Fully sharded data parallelism: parameters and the batch split (ZeRO-3)."""
    expert: int = 1
    """Expert parallelism, for mixture-of-experts models: their experts split over it, the
    batch too (each device's tokens go to the devices of their experts and come back)."""
    tensor: int = 1
    """Tensor (model) parallelism: weight matrices split along their hidden dimensions."""
    context: int = 1
    """Context parallelism: the sequence split."""

    def problems(self, key: str, allow_fill: bool) -> Problems:
        """Sizes that are not positive (or -1 on one axis, where `allow_fill`)."""
        found = Problems()
        sizes = axes_tuple(self)
        for axis, n in zip(AXES, sizes):
            allowed = "positive integers, or -1 on one axis" if allow_fill else "positive integers"
            found.check(
                n >= 1 or (allow_fill and n == -1),
                f"{key}.{axis}={n}: mesh axis sizes are {allowed}.",
            )
        wild = [a for a, n in zip(AXES, sizes) if n == -1]
        found.check(len(wild) <= 1, f"{key}: only one axis may be -1, got {wild}.")
        return found


@dataclass(frozen=True)
class Mesh:
    """Axis sizes inside a slice (`ici`, fast interconnect) and across slices (`dcn`)."""

    ici: tuple[int, ...]
    dcn: tuple[int, ...]

    @property
    def axis_names(self) -> tuple[str, ...]:
        return AXES

    @property
    def shape(self) -> dict[str, int]:
        """Total devices along each axis (ici × dcn)."""
        return {a: i * d for a, i, d in zip(AXES, self.ici, self.dcn)}

    @property
    def num_devices(self) -> int:
        return math.prod(self.ici) * math.prod(self.dcn)

    @property
    def num_slices(self) -> int:
        return math.prod(self.dcn)

    def size(self, entry: SpecEntry) -> int:
        """How many shards a partition spec entry cuts a dimension into."""
        if entry is None:
            return 1
        names = (entry,) if isinstance(entry, str) else entry
        return math.prod(self.shape[name] for name in names)

    def describe(self) -> str:
        used = {a: n for a, n in self.shape.items() if n > 1} or {"data": 1}
        text = " x ".join(f"{a}={n}" for a, n in used.items())
        if self.num_slices > 1:
            text += f" ({self.num_slices} slices)"
        return text


def axes_tuple(cfg: MeshAxesConfig) -> tuple[int, ...]:
    return tuple(getattr(cfg, a) for a in AXES)


def resolve_mesh(ici: MeshAxesConfig, dcn: MeshAxesConfig, num_devices: int | None) -> Mesh:
    """The mesh the config asks for, checked against the devices there are.

    One `ici_mesh` axis may be -1 and takes the devices the others leave. `num_devices=None`
    skips the device-count check (eager backends, where the mesh describes the target run and
    is not applied); a -1 then counts as 1.
    """
    ici_sizes, dcn_sizes = axes_tuple(ici), axes_tuple(dcn)
    found = ici.problems("ici_mesh", allow_fill=True)
    found += dcn.problems("dcn_mesh", allow_fill=False)
    found.raise_if_any()
    if -1 in ici_sizes:
        known = math.prod(n for n in ici_sizes if n != -1) * math.prod(dcn_sizes)
        if num_devices is None:
            fill = 1
        elif num_devices % known:
            axis = AXES[ici_sizes.index(-1)]
            raise ConfigError(
                f"ici_mesh.{axis}=-1 cannot fill {num_devices} devices: the other axes "
                f"(ici x dcn) already use {known}, which does not divide {num_devices}."
            )
        else:
            fill = num_devices // known
        ici_sizes = tuple(fill if n == -1 else n for n in ici_sizes)
    mesh = Mesh(ici_sizes, dcn_sizes)
    if num_devices is not None and mesh.num_devices != num_devices:
        raise ConfigError(
            f"ici_mesh {_show(ici_sizes)} x dcn_mesh {_show(dcn_sizes)} = {mesh.num_devices} "
            f"devices, but there are {num_devices}. Make the product of the mesh axes equal "
            f"{num_devices} (or set one ici_mesh axis to -1)."
        )
    return mesh


def _show(sizes: tuple[int, ...]) -> str:
    return "{" + ", ".join(f"{a}: {n}" for a, n in zip(AXES, sizes) if n != 1) + "}"


def fold_mesh(mesh: Mesh, max_devices: int) -> Mesh:
    """A one-slice mesh of at most `max_devices` devices with the same axes as `mesh`.

    Slices are merged into their axes, then the largest axis is halved (or divided by its
    smallest prime factor) until the mesh fits; an axis split over several devices keeps at
    least 2, so every kind of parallelism the real mesh uses is still exercised.
    """
    sizes = dict(mesh.shape)
    while math.prod(sizes.values()) > max_devices:
        splittable = {a: n for a, n in sizes.items() if n > 2} or {
            a: n for a, n in sizes.items() if n > 1
        }
        if not splittable:
            break
        axis = max(splittable, key=lambda a: (splittable[a], -AXES.index(a)))
        sizes[axis] //= _smallest_factor(sizes[axis])
    return Mesh(tuple(sizes[a] for a in AXES), (1,) * len(AXES))


def _smallest_factor(n: int) -> int:
    return next(f for f in range(2, n + 1) if n % f == 0)


def device_grid(mesh: Mesh) -> list[int]:
    """Device (process rank) ids laid out on `mesh`, flattened in row-major order of
    `mesh.shape`: slices outermost on every axis, so a slice (a host's devices, when one host
    is one slice) holds a contiguous block of each axis it spans. One id per device."""
    import torch

    ndim = len(AXES)
    ids = torch.arange(mesh.num_devices).reshape(*mesh.dcn, *mesh.ici)
    # (dcn_0, .., dcn_4, ici_0, .., ici_4) → (dcn_0, ici_0, dcn_1, ici_1, ...): on each axis
    # the slice index is the outer part of the coordinate.
    order = [i for axis in range(ndim) for i in (axis, ndim + axis)]
    return ids.permute(order).reshape(-1).tolist()


def coordinates(mesh: Mesh, device: int) -> dict[str, int]:
    """Where device (rank) `device` sits on each axis of `mesh` (as `device_grid` lays them)."""
    flat = device_grid(mesh).index(device)
    coords = {}
    for axis in reversed(AXES):
        flat, coords[axis] = divmod(flat, mesh.shape[axis])
    return {a: coords[a] for a in AXES}


def data_parallel_index(mesh: Mesh, device: int) -> int:
    """The share of the batch device `device` computes on: its coordinate along the batch
    axes (data, fsdp, expert), data outermost (the batch spec's order)."""
    c = coordinates(mesh, device)
    index = 0
    for axis in BATCH_AXES:
        index = index * mesh.shape[axis] + c[axis]
    return index


def describe_batch_axes(mesh: Mesh) -> str:
    """The batch axes as error messages name them: "data x fsdp", with expert when used."""
    return " x ".join(a for a in BATCH_AXES if a != "expert" or mesh.shape[a] > 1)
