"""The collective audit: every collective of a partitioned XLA module, on its mesh axes, mapped
back to the weights it moves, and what should not be there for the configured layout.

It reads the after-optimizations HLO text XLA dumps (`--xla_dump_to`, as debug.dump_hlo and
the dry run set it): the per-device program the SPMD partitioner made. XLA:CPU has no
reduce-scatter pass, so a gradient's reduce-scatter appears there as an all-reduce whose result
each device then cuts to its own part (by `partition-id`); the audit reads that pattern as the
reduce-scatter a TPU compiles it to.

Flags:
- a weight gathered over an axis that is not data-parallel (`tensor`, `context`, and `expert`
  for an expert's weights, which expert parallelism keeps where they are stored): its spec
  splits it for compute, and the partitioner gathers it whole because its neighbours' specs
  disagree;
- a weight matrix's gradient all-reduced whole over an axis the weight is split on, where FSDP
  reduce-scatters it (vectors are left out: a [hidden] all-reduce is as likely a norm's
  statistic, and costs nothing);
- an activation gathered on its batch or sequence dimension (keys and values over `context`
  excepted: context parallelism gathers them on purpose; a mixture-of-experts layer's expert
  buffers [experts, slots, hidden] are named as such and not flagged: the partitioner may
  gather their slots rather than the experts' weights, whichever is smaller);
- attention's [batch, heads, ...] tensors gathered on the heads over `tensor`: every
  tensor-parallel device then computes attention for all heads;
- every "involuntary full rematerialization" the partitioner logged.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from torchprime.mesh import AXES, Mesh, axes_of, coordinates
from torchprime.plan import ParameterPlan, ShardingPlan, shard_shape

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DATA_AXES = ("data", "fsdp")
#: `expert` splits the batch too (torchprime/mesh.py BATCH_AXES): a weight other than an
#: expert's may be split over it like over fsdp, and gathered where it is used.
EXPERT_PARALLEL = "expert"

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = (?P<type>\([^)]*\)|\w+\[[\d,]*\])\S*\s+"
    r"(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_DIMENSIONS = re.compile(r"dimensions=\{(\d+)\}")
_SOURCE = re.compile(r'source_file="([^"]+)" source_line=(\d+)')
REMAT_MESSAGE = "Involuntary full rematerialization"


class HloParseError(ValueError):
    """A dump the audit cannot read (names the file and line)."""


@dataclass(frozen=True)
class Collective:
    kind: str
    """One of KINDS; an all-reduce cut per device afterwards is reported as reduce-scatter."""
    dtype: str
    shape: tuple[int, ...]
    """The result's shape (for an all-gather: the gathered tensor)."""
    axes: tuple[str, ...]
    """The mesh axes its device groups span."""
    dimension: int | None
    """The gathered (or scattered) dimension, when the instruction names one."""
    instruction: str
    line: int
    source: str | None = None
    """The Python line that caused it, when the dump has metadata (XLA_HLO_DEBUG=1)."""
    runs: int = 1
    """Times it runs a step: a while loop's trip count (a scan over layers) when inside one."""
    moves_input: bool = False
    """Its operand is one of the step's inputs as stored (a weight, not a computed value)."""

    @property
    def bytes(self) -> int:
        size = 1
        for n in self.shape:
            size *= n
        return size * _DTYPE_BYTES.get(self.dtype, 4)


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "pred": 1, "f64": 8}


def _iota_groups(shape: str, dims: str, perm: str | None) -> list[list[int]]:
    import numpy as np

    sizes = [int(x) for x in dims.split(",")]
    ids = np.arange(int(np.prod(sizes))).reshape(sizes)
    if perm:
        ids = ids.transpose([int(x) for x in perm.split(",")])
    return ids.reshape([int(x) for x in shape.split(",")]).tolist()


def _groups(rest: str, num_devices: int) -> list[list[int]]:
    if m := _IOTA_GROUPS.search(rest):
        return _iota_groups(*m.groups())
    if m := _PAIRS.search(rest):
        return [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)\}", m.group(1))]
    if m := _LIST_GROUPS.search(rest):
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m[1])]
        return [g for g in groups if g] or [list(range(num_devices))]
    return [list(range(num_devices))]


def _axes(groups: list[list[int]], mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes along which the members of the groups differ."""
    varying: set[str] = set()
    for group in groups:
        coords = [coordinates(mesh, d) for d in group if d < mesh.num_devices]
        for axis in AXES:
            if len({c[axis] for c in coords}) > 1:
                varying.add(axis)
    return tuple(a for a in AXES if a in varying)


def parse_collectives(text: str, mesh: Mesh, path: str = "<hlo>") -> list[Collective]:
    """Every collective of one module's HLO text, its groups read as `mesh` axes."""
    lines = text.splitlines()
    users: dict[str, list[int]] = defaultdict(list)
    for i, line in enumerate(lines):
        if " = " in line:
            for operand in set(_OPERAND.findall(line.split(" = ", 1)[1])):
                users[operand].append(i)
    bodies = _computations(lines)
    trips = _loop_trips(text)
    found = []
    computation = None
    for i, line in enumerate(lines):
        if head := re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line):
            computation = head[1]
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        try:
            arrays = [
                (d, tuple(int(x) for x in s.split(",") if x)) for d, s in _ARRAY.findall(m["type"])
            ]
            axes = _axes(_groups(m["rest"], mesh.num_devices), mesh)
        except (ValueError, IndexError) as e:
            raise HloParseError(
                f"{path}:{i + 1}: cannot read this collective ({e}): {line.strip()[:160]}"
            ) from e
        kind = m["kind"]
        if kind == "all-reduce" and any(_cuts(lines[u], bodies) for u in users[m["name"]]):
            kind = "reduce-scatter"  # XLA:CPU's form of it: all-reduce, then each device's part
        dim = _DIMENSIONS.search(m["rest"])
        source = _SOURCE.search(m["rest"])
        for dtype, shape in arrays:
            found.append(
                Collective(
                    kind,
                    dtype,
                    shape,
                    axes,
                    int(dim[1]) if dim else None,
                    m["name"],
                    i + 1,
                    f"{source[1]}:{source[2]}" if source else None,
                    trips.get(computation, 1),
                    bool(re.match(r"%param[.\w]*\)", m["rest"])),
                )
            )
    return found


def _computations(lines: list[str]) -> dict[str, str]:
    """Each computation's body text by name (fused computations are where a slice hides)."""
    bodies, name, body = {}, None, []
    for line in lines:
        if m := re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line):
            name, body = m[1], []
        elif line.startswith("}") and name:
            bodies[name] = "\n".join(body)
            name = None
        elif name:
            body.append(line)
    return bodies


def _loop_trips(text: str) -> dict[str, int]:
    """Trip counts of while-loop bodies, as XLA annotates them (a scan over the layers)."""
    trips = {}
    for m in re.finditer(r"body=%([\w.\-]+).*?known_trip_count\W+n\W+(\d+)", text):
        trips[m[1]] = int(m[2])
    return trips


def _cuts(user: str, bodies: dict[str, str]) -> bool:
    """Whether an all-reduce's user keeps only this device's part of it: a slice at an offset
    from the partition id, in the line itself or inside the computation it calls (in a scan
    the offset comes from outside the loop body)."""
    if "partition-id" in user:
        return True
    called = re.search(r"calls=%([\w.\-]+)", user)
    return bool(called) and "dynamic-slice(" in bodies.get(called[1], "")


def step_module(dump_dir: Path) -> Path | None:
    """The training step's partitioned module among a dump's: the one with the most
    collectives (the others initialize weights or move single tensors)."""
    best, most = None, -1
    for path in sorted(dump_dir.glob("*after_optimizations.txt")):
        count = sum(path.read_text().count(f" {k}(") for k in KINDS)
        if count > most:
            best, most = path, count
    return best


@dataclass(frozen=True)
class Row:
    kind: str
    axes: tuple[str, ...]
    what: str
    count: int
    bytes: int
    """All of them, per device, as the result shapes say."""


@dataclass
class Audit:
    module: str
    rows: list[Row] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    layers: int = 1


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def _without(p: ParameterPlan, axes: tuple[str, ...], mesh: Mesh) -> tuple[int, ...]:
    """`p`'s shard shape with the split over `axes` undone."""
    spec = tuple(tuple(a for a in axes_of(e) if a not in axes) or None for e in p.spec)
    return shard_shape(p.shape, spec, mesh)


def _weights(c: Collective, plan: ShardingPlan) -> list[ParameterPlan]:
    if c.kind == "reduce-scatter" and c.dimension is not None:  # a real one: the shard
        return [p for p in plan.parameters if p.shard_shape == c.shape]
    if (
        c.kind == "all-gather"
    ):  # a weight gathered: the shape once its split over the axes is undone
        return [
            p
            for p in plan.parameters
            if p.shard_shape != c.shape and _without(p, c.axes, plan.mesh) == c.shape
        ]
    # a gradient reduced: its full extent on the axes, or a weight replicated over them
    return [
        p for p in plan.parameters if c.shape in (_without(p, c.axes, plan.mesh), p.shard_shape)
    ]


def _expert_buffer(c: Collective, plan: ShardingPlan) -> bool:
    """Whether `c` moves a mixture-of-experts layer's expert buffer [experts, slots, hidden]
    (all of a layer's experts or a device's share of them)."""
    down = [p for p in plan.parameters if p.name.endswith(".experts.down_proj")]
    if not down or len(c.shape) != 3:
        return False
    p = down[0]  # [experts, hidden, width]
    return c.shape[0] in (p.shape[0], p.shard_shape[0]) and c.shape[2] == p.shape[1]


def audit(
    collectives: list[Collective], plan: ShardingPlan, layers: int, module: str, log_text: str = ""
) -> Audit:
    """The audit of one step's collectives against the plan they were partitioned for."""
    result = Audit(module=module, layers=layers)
    rows: dict[tuple, list[Collective]] = defaultdict(list)
    for c in collectives:
        if not c.shape:
            what = "scalars (losses, norms, counters)"
        elif weights := _weights(c, plan):
            names = sorted({_pattern(p.name) for p in weights})
            what = " or ".join(names)
            result.flags += _weight_flags(c, weights, names)
        elif _expert_buffer(c, plan):
            # How the experts' matmuls are split is the partitioner's choice: with their
            # weights split over fsdp it may gather a buffer's slots instead of the weights.
            what = f"expert buffer {c.dtype}{list(c.shape)}"
        else:
            what = f"activation {c.dtype}{list(c.shape)}"
            result.flags += _activation_flags(c)
        rows[(c.kind, c.axes, what)].append(c)
    result.flags = _counted(result.flags)
    for (kind, axes, what), cs in rows.items():
        runs = sum(c.runs for c in cs)
        result.rows.append(Row(kind, axes, what, runs, sum(c.bytes * c.runs for c in cs)))
    result.rows.sort(key=lambda r: (KINDS.index(r.kind), r.axes, -r.bytes))
    remats = [_remat_flag(line) for line in log_text.splitlines() if REMAT_MESSAGE in line]
    result.flags += _counted(remats)
    return result


_REMAT = re.compile(
    r"go from sharding (?P<src>\{.*?\}) to (?P<dst>\{.*?\}) efficiently for HLO operation "
    r"%(?P<op>[\w.\-]+) = (?P<shape>\w+\[[\d,]*\])"
)


def _remat_flag(line: str) -> str:
    """The partitioner's warning in a line: which tensor it replicated whole, and between
    which shardings."""
    m = _REMAT.search(line)
    if not m:
        return f"involuntary full rematerialization: {line.strip()[:300]}"
    kind = re.sub(r"\.\d+$", "", m["op"])
    return (
        f"involuntary full rematerialization: a {kind} {m['shape']} is replicated whole on every "
        f"device to go from sharding {m['src']} to {m['dst']} (an activation spec splits a "
        "dimension the next operation cannot take split)"
    )


def _counted(flags: list[str]) -> list[str]:
    """Each distinct flag once, with how many collectives raised it."""
    counts: dict[str, int] = {}
    for f in flags:
        counts[f] = counts.get(f, 0) + 1
    return [f if n == 1 else f"{f} (x{n})" for f, n in counts.items()]


def _weight_flags(c: Collective, weights: list[ParameterPlan], names: list[str]) -> list[str]:
    which = " or ".join(names)
    spec = ", ".join(str(list(p.spec)) for p in weights[:1])
    where = f" ({c.source})" if c.source else ""
    if c.kind == "collective-permute" and c.moves_input:
        return [
            f"{which} {spec} is moved between devices as stored{where}: the devices that hold "
            "its shards are not the ones that use them, so its spec disagrees with the "
            "activations it meets"
        ]
    experts = any(".experts." in f".{p.name}" for p in weights)
    data_axes = DATA_AXES if experts else (*DATA_AXES, EXPERT_PARALLEL)
    if c.kind == "all-gather" and any(a not in data_axes for a in c.axes):
        return [
            f"{which} {spec} is all-gathered over {'+'.join(c.axes)}{where}: it is split there "
            "for compute, so the partitioner un-splits it whole; its spec disagrees with the "
            "activations or the weights it meets (check the pattern's dimensions)"
        ]
    if (
        c.kind == "all-reduce"
        and len(c.shape) >= 2
        and any(a in axes_of(e) for p in weights for e in p.spec for a in c.axes)
    ):
        return [
            f"{which}'s gradient {spec} is all-reduced whole over {'+'.join(c.axes)}{where} "
            "where FSDP reduce-scatters it: every device receives all of it"
        ]
    return []


def _activation_flags(c: Collective) -> list[str]:
    if c.kind != "all-gather" or c.dimension is None or len(c.shape) < 3:
        return []
    if len(c.shape) == 3:
        names = ("batch", "sequence", "feature")
    else:
        names = ("batch", "heads", "sequence", "head_dim")
    dim = names[c.dimension] if c.dimension < len(names) else "feature"
    where = f" ({c.source})" if c.source else ""
    if dim == "heads" and "tensor" in c.axes:
        return [
            f"attention activation {c.dtype}{list(c.shape)} is all-gathered on its heads over "
            f"tensor{where}: every tensor-parallel device computes attention for all heads "
            "(the q/k/v projections' specs or model.sharding.qkv do not keep heads split)"
        ]
    if dim not in ("batch", "sequence"):
        return []
    if dim == "sequence" and c.axes == ("context",) and len(c.shape) == 4:
        return []  # context parallelism's key/value gather
    return [
        f"activation {c.dtype}{list(c.shape)} is all-gathered on its {dim} dimension over "
        f"{'+'.join(c.axes)}{where}: each device ends up with rows or tokens another device "
        "computes; an activation or input spec is missing or disagrees"
    ]


def format_audit(a: Audit) -> str:
    from torchprime.plan import format_bytes

    lines = [f"collectives of one step ({Path(a.module).name}, per device):"]
    lines.append(f"  {'kind':<19}{'axes':<14}{'count':>6}{'/layer':>8}{'bytes':>12}  what")
    for r in a.rows:
        per_layer = f"{r.count / a.layers:g}" if ".*." in r.what else ""
        lines.append(
            f"  {r.kind:<19}{','.join(r.axes):<14}{r.count:>6}{per_layer:>8}"
            f"{format_bytes(r.bytes):>12}  {r.what}"
        )
    if a.flags:
        lines.append(f"  FLAGS {len(a.flags)}")
        lines += [f"    - {f}" for f in a.flags]
    else:
        lines.append("  no flags: every collective fits the layout")
    return "\n".join(lines)
