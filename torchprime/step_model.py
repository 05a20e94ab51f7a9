"""The step model: how long one training step of the real model should take on the target pod,
and which resource bounds it, computed from the sharding plan without running anything.

Per device and per step it counts
- compute: the model FLOPs the trainer's mfu uses (6 × N + attention), plus the forward pass
  again when the decoder layers are rematerialized;
- HBM traffic of the weights and the optimizer: each matmul weight read once in the forward
  and twice in the backward (once more when rematerialized), per micro-batch, and AdamW's
  read of parameters, gradients and moments and its writes, once per step;
- the bytes each collective moves, by kind and mesh axes, over ICI or DCN:
  FSDP all-gathers of every weight split over `data`/`fsdp` before the forward and again
  before the backward, and reduce-scatters of its gradient; all-reduces of the gradients of
  weights replicated over a data-parallel axis; tensor parallelism's all-reduces of each
  layer's [tokens, hidden] activations (2 in the forward, 2 in the backward, 2 more when
  rematerialized); context parallelism's all-gathers of keys and values (and reduce-scatters
  of their gradients), or with the Pallas kernels, which split heads over `context` instead,
  the all-to-alls that swap q, k, v to heads and the output back; a mixture-of-experts
  layer's routing: per row (capacity_per_row, models/moe_rows.py), the all-to-alls over
  `expert` that send each device's expert buffers (k x capacity factor slots a token) to the
  experts' devices and the outputs back, in each forward pass and for their gradients; over
  the whole micro-batch (capacity, dropless: models/moe.py), every data-parallel device
  (data, fsdp, expert) gathers the micro-batch's tokens [tokens, hidden] and the k expert
  outputs of each [k x tokens, hidden] in each forward pass, and reduce-scatters their
  gradients (both measured in the partitioned step).
Ring collectives: an all-gather or reduce-scatter over n devices moves (n-1)/n of the full
tensor into each device, an all-reduce twice that; an axis spanning slices runs its ring inside
each slice over ICI first, then across slices over DCN on 1/ici of the bytes.

The roofline: each resource's time is its work over the chip's peak (torchprime/chips.py), and
the step takes at least the longest of them (perfect overlap). The predicted tokens/s/chip and
MFU are therefore upper bounds; the sum of the times is printed beside them as the step with no
overlap at all. Not counted: activation HBM traffic, the embedding lookup's and the vocabulary
projection's collectives under tensor parallelism, latency of small collectives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torchprime.chips import Chip
from torchprime.mesh import AXES, BATCH_AXES, Mesh, axes_of
from torchprime.plan import ShardingPlan, format_bytes

#: Mesh axes whose weight shards are gathered before use (FSDP). `expert` splits the batch
#: too (BATCH_AXES), but a weight split over it is an expert's, used where it is stored.
DATA_AXES = ("data", "fsdp")


@dataclass(frozen=True)
class StepShape:
    """What the step model needs of the model, the batch and the rewriting."""

    model_flops_per_token: float
    """Training FLOPs per token (trainers.metrics.model_flops_per_token)."""
    tokens_per_step: int
    """Tokens of one optimizer step over the whole mesh."""
    micro_batches: int
    layers: int
    hidden: int
    kv_dim: int
    """Key (and value) width per token: kv heads × head dim."""
    q_dim: int
    """Query (and attention output) width per token: heads × head dim."""
    heads_over_context: bool
    """Attention splits heads, not the sequence, over `context` (the Pallas kernels)."""
    activation_bytes: int
    """Bytes of one activation element (the compute dtype)."""
    rematerialized: bool
    """The decoder layers' forward runs again in the backward pass."""
    experts_per_token: int = 0
    """Mixture of experts: the k experts each token is routed to; 0 for a dense model."""
    expert_slots_per_token: float = 0.0
    """Mixture of experts routed per row: the expert-buffer slots of a token (k x capacity
    factor) that expert parallelism sends to the experts' devices; 0: routed over the whole
    micro-batch (its tokens gathered on every device)."""


@dataclass(frozen=True)
class Traffic:
    """Bytes one device receives per step for one kind of collective on some mesh axes."""

    kind: str
    axes: tuple[str, ...]
    what: str
    count: int
    """Collectives of this kind per step."""
    ici_bytes: float
    dcn_bytes: float


@dataclass
class StepModel:
    chip: str
    devices: int
    traffic: list[Traffic] = field(default_factory=list)
    flops: float = 0.0
    """Per device per step, rematerialization included."""
    model_flops: float = 0.0
    """Per device per step, as mfu counts them."""
    hbm_bytes: float = 0.0
    seconds: dict[str, float | None] = field(default_factory=dict)
    """compute, hbm, ici, dcn: each resource's time alone (None: no bandwidth figure)."""
    tokens_per_device: float = 0.0
    missing: list[str] = field(default_factory=list)
    """What could not be computed, and why."""
    peak_flops: float = 0.0

    @property
    def known(self) -> dict[str, float]:
        return {k: v for k, v in self.seconds.items() if v is not None}

    @property
    def bound(self) -> str:
        return max(self.known, key=self.known.__getitem__)

    @property
    def step_seconds(self) -> float:
        """The roofline: the longest resource time (a lower bound on the step)."""
        return max(self.known.values())

    @property
    def serial_seconds(self) -> float:
        """Every resource one after the other: the step with no overlap."""
        return sum(self.known.values())

    @property
    def tokens_per_second_per_chip(self) -> float:
        return self.tokens_per_device / self.step_seconds

    @property
    def mfu_bound(self) -> float:
        return self.model_flops / self.step_seconds / self.peak_flops

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(
            bound=self.bound,
            step_seconds=self.step_seconds,
            serial_seconds=self.serial_seconds,
            tokens_per_second_per_chip=self.tokens_per_second_per_chip,
            mfu_bound=self.mfu_bound,
        )
        return out


def _ring_bytes(mesh: Mesh, axes: tuple[str, ...], full_bytes: float, passes: int) -> tuple:
    """(ICI, DCN) bytes one device receives for `passes` ring passes (1: all-gather or
    reduce-scatter, 2: all-reduce) over `axes` of a tensor of `full_bytes` once gathered."""
    ici = math.prod(mesh.ici[AXES.index(a)] for a in axes)
    dcn = math.prod(mesh.dcn[AXES.index(a)] for a in axes)
    return (
        passes * full_bytes * (ici - 1) / ici,
        passes * full_bytes / ici * (dcn - 1) / dcn,
    )


def _tally(table: dict, axes: tuple[str, ...], nbytes: float) -> None:
    entry = table.setdefault(axes, [0.0, 0])
    entry[0] += nbytes
    entry[1] += 1


def _add(model: StepModel, mesh: Mesh, kind, axes, what, count, step_bytes, passes=1) -> None:
    """`count` collectives a step moving `step_bytes` in all (once gathered), `passes` rings
    each."""
    if not axes or count == 0 or math.prod(mesh.shape[a] for a in axes) == 1:
        return
    ici, dcn = _ring_bytes(mesh, axes, step_bytes, passes)
    model.traffic.append(Traffic(kind, axes, what, count, ici, dcn))


def predict_step(plan: ShardingPlan, shape: StepShape, chip: Chip) -> StepModel:
    """The step model of `plan` on `chip` (see the module's docstring for what it counts)."""
    mesh = plan.mesh
    n = mesh.num_devices
    model = StepModel(chip=f"TPU {chip.name}", devices=n, peak_flops=chip.peak_flops)
    micro = shape.micro_batches
    weight_passes = 4 if shape.rematerialized else 3  # forward, two in the backward (+ remat)

    gathered: dict[tuple[str, ...], list[float]] = {}  # axes -> [bytes once gathered, weights]
    replicated: dict[tuple[str, ...], list[float]] = {}
    for p in plan.parameters:
        used = {a for entry in p.spec for a in axes_of(entry)}
        split = tuple(a for a in DATA_AXES if a in used and mesh.shape[a] > 1)
        full = p.shard_bytes * math.prod(mesh.shape[a] for a in split)
        if split:
            _tally(gathered, split, full)
        over = tuple(a for a in BATCH_AXES if a not in used and mesh.shape[a] > 1)
        if over:
            _tally(replicated, over, p.shard_bytes)
        model.hbm_bytes += full * weight_passes * micro
    for axes, (full, weights) in gathered.items():
        count = int(weights) * micro
        what = "weights, before the forward and the backward"
        _add(model, mesh, "all-gather", axes, what, 2 * count, 2 * micro * full)
        _add(model, mesh, "reduce-scatter", axes, "gradients", count, micro * full)
    for axes, (full, weights) in replicated.items():
        what = "gradients of weights replicated there"
        _add(model, mesh, "all-reduce", axes, what, int(weights) * micro, micro * full, 2)
    # AdamW: read parameters, gradients and both moments, write parameters and moments.
    model.hbm_bytes += 2 * plan.parameter_bytes + plan.gradient_bytes + 2 * plan.optimizer_bytes

    batch_ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    local_tokens = shape.tokens_per_step / micro / batch_ways / mesh.shape["context"]
    per_layer = shape.layers * micro
    activation = local_tokens * shape.hidden * shape.activation_bytes
    tp_count = (6 if shape.rematerialized else 4) * per_layer
    what = "layer outputs [tokens, hidden]"
    _add(model, mesh, "all-reduce", ("tensor",), what, tp_count, tp_count * activation, 2)
    passes = 2 if shape.rematerialized else 1  # forward passes through attention
    if shape.heads_over_context:
        # Sequence-split q, k, v swapped for head-split ones and the output back (all-to-all),
        # in each forward pass and again for their gradients.
        # An all-to-all sends (n-1)/n of what the device holds: its tokens, all heads.
        qkvo = local_tokens * (2 * shape.q_dim + 2 * shape.kv_dim)
        swaps = (passes + 1) * per_layer
        what = "q, k, v to heads and the output back"
        _add(model, mesh, "all-to-all", ("context",), what, 4 * swaps,
             swaps * qkvo * shape.activation_bytes)  # fmt: skip
    else:
        kv = local_tokens * mesh.shape["context"] * 2 * shape.kv_dim * shape.activation_bytes
        gathers = passes * per_layer
        _add(model, mesh, "all-gather", ("context",), "keys and values", gathers, gathers * kv)
        what = "key and value gradients"
        _add(model, mesh, "reduce-scatter", ("context",), what, per_layer, per_layer * kv)

    if shape.expert_slots_per_token:
        # Routing per row: each device's buffers to the experts' devices and the outputs
        # back (all-to-all over `expert`), in each forward pass and for their gradients.
        buffers = local_tokens * shape.expert_slots_per_token * shape.hidden
        swaps = 2 * (passes + 1) * per_layer
        what = "MoE tokens to their experts' devices and the outputs back"
        _add(model, mesh, "all-to-all", ("expert",), what, swaps,
             swaps * buffers * shape.activation_bytes)  # fmt: skip
    elif shape.experts_per_token:
        # The routing over the whole micro-batch: its tokens and their k expert outputs
        # gathered on every data-parallel device, their gradients reduce-scattered.
        routed = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
        batch = local_tokens * batch_ways
        moved = batch * (1 + shape.experts_per_token) * shape.hidden * shape.activation_bytes
        what = "MoE routing: the micro-batch's tokens and their k expert outputs"
        _add(model, mesh, "all-gather", routed, what, 2 * passes * per_layer,
             passes * per_layer * moved)  # fmt: skip
        _add(model, mesh, "reduce-scatter", routed, what, 2 * per_layer, per_layer * moved)

    model.tokens_per_device = shape.tokens_per_step / n
    model.model_flops = shape.model_flops_per_token * model.tokens_per_device
    model.flops = model.model_flops * (4 / 3 if shape.rematerialized else 1)
    ici = sum(t.ici_bytes for t in model.traffic)
    dcn = sum(t.dcn_bytes for t in model.traffic)
    model.seconds["compute"] = model.flops / chip.peak_flops
    model.seconds["hbm"] = _time(model, "HBM", model.hbm_bytes, chip.hbm_bandwidth, chip.name)
    # The ICI figure counts both directions: a device receives at most half of it.
    ici_bw = chip.ici_bandwidth / 2 if chip.ici_bandwidth else None
    model.seconds["ici"] = _time(model, "ICI", ici, ici_bw, chip.name)
    model.seconds["dcn"] = _time(model, "DCN", dcn, chip.dcn_bandwidth, chip.name)
    return model


def _time(model: StepModel, name: str, work: float, bandwidth: float | None, chip) -> float | None:
    if work == 0:
        return 0.0
    if bandwidth is None:
        model.missing.append(
            f"{name} time: the chip table has no {name} bandwidth for TPU {chip} "
            f"({format_bytes(work)} a step not timed); the prediction leaves it out"
        )
        return None
    return work / bandwidth


def format_step_model(m: StepModel) -> str:
    """The table the dry run and plan_only print."""
    lines = [
        f"step model (roofline, per device per step, {m.chip} x {m.devices}):",
        f"  {'collective':<15}{'axes':<14}{'count':>7}{'ICI':>12}{'DCN':>12}  what",
    ]
    for t in m.traffic:
        lines.append(
            f"  {t.kind:<15}{','.join(t.axes):<14}{t.count:>7}{format_bytes(t.ici_bytes):>12}"
            f"{format_bytes(t.dcn_bytes):>12}  {t.what}"
        )
    if not m.traffic:
        lines.append("  (no collectives: nothing is split)")
    times = ", ".join(
        f"{k} {format_seconds(v)}" if v is not None else f"{k} ?" for k, v in m.seconds.items()
    )
    lines += [
        f"  compute {m.flops / 1e12:,.1f} TFLOP, HBM {format_bytes(m.hbm_bytes)}; alone: {times}",
        f"  step >= {format_seconds(m.step_seconds)} ({m.bound}-bound; "
        f"{format_seconds(m.serial_seconds)} with no overlap): at most "
        f"{m.tokens_per_second_per_chip:,.0f} tokens/s/chip, MFU at most {m.mfu_bound:.0%}",
    ]
    lines += [f"  not computed: {x}" for x in m.missing]
    return "\n".join(lines)


def format_seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms"
    return f"{t * 1e6:.0f} us"
