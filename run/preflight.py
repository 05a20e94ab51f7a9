"""Pre-flight: everything a run is checked for before it touches a device, in one place.

Training, `plan_only` and the dry run all call `preflight`, with the devices they check
against: the ones the run has (`Devices.of_backend`), or the target pod's (`Devices.of_target`).
It builds what the checks need once (the tokenizer, the mesh, the model on the meta device,
its sharding specs, this host's data pipeline, the sharding plan and the activation estimate)
and collects every problem it finds before reporting: each config block's own (`problems()`),
then those between the config, the model, the mesh and the devices. A check that needs what an
earlier one could not build is skipped, and the report says so.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from data.eval_batches import cut_eval_batches, training_holdout
from data.pipeline import TextBatches, shard_layout
from data.tokenizers import Tokenizer, build_tokenizer
from models import build_model
from models.memory import (
    ActivationEstimate,
    estimate_activations,
    expert_slots_per_token,
    routed_per_row,
)
from optimizers.groups import param_groups
from torchprime.attention import TPU_KERNELS, check_attention_kernel
from torchprime.backend.base import Backend
from torchprime.chips import CHIPS, Chip, chip_of
from torchprime.context import context_problems, context_size, splits_sequence
from torchprime.dtensor_layout import check_dtensor_specs
from torchprime.errors import ConfigError, Problems
from torchprime.experts import expert_problems
from torchprime.mesh import AXES, Mesh, data_parallel_index, describe_batch_axes, resolve_mesh
from torchprime.plan import (
    FitVerdict,
    ShardingPlan,
    fit_verdict,
    format_bytes,
    format_plan,
    make_plan,
)
from torchprime.rewriting import check_remat, listed_name
from torchprime.sharding import (
    BATCH_SPEC,
    ActivationSpec,
    PartitionSpec,
    dispatch_spec,
    micro_batch_rows,
    plan_activation_specs,
    plan_parameter_specs,
    qkv_spec,
)
from torchprime.stacking import layer_specs, meta_stacked, split_layer_dim_problem
from torchprime.step_model import StepModel, StepShape, format_step_model, predict_step
from train_config import TargetConfig, TrainConfig
from trainers import get_trainer_class
from trainers.metrics import model_flops_per_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Devices:
    """What a config is checked against: the devices a run has, or its target pod's."""

    kind: str
    """As `backend.device_kind` names them: "TPU v5p", "CPU", a GPU's name."""
    count: int | None
    """Devices the mesh must cover (None: a target pod whose size is not said)."""
    hosts: int = 1
    host_index: int = 0
    engine: str = "xla"
    """What runs them: "xla" (one program over every device), "torch.distributed" (one
    process per device, under torchrun) or "eager" (this one process, one device)."""
    rank: int = 0
    """This process's device on the mesh (torch.distributed)."""
    local_processes: int = 1
    """Processes on this host (torch.distributed)."""
    chip: Chip | None = None
    """The TPU chip, when known (its HBM judges the plan)."""
    target: bool = False
    """These are the target pod's devices (plan_only, dry run), not the ones here."""

    @classmethod
    def of_backend(cls, backend: Backend) -> Devices:
        engine = "xla" if backend.is_xla else "eager"
        if backend.local_batch:
            engine = "torch.distributed"
        return cls(
            kind=backend.device_kind,
            count=backend.device_count,
            hosts=backend.process_count,
            host_index=backend.process_index,
            chip=chip_of(backend.device_kind),
            engine=engine,
            rank=getattr(backend, "rank", 0),
            local_processes=getattr(backend, "local_processes", 1),
        )

    @classmethod
    def of_target(cls, target: TargetConfig) -> Devices:
        chip = CHIPS[target.chip] if target.chip else None
        hosts = 1
        if chip and target.num_devices:
            hosts = max(1, target.num_devices // chip.chips_per_host)
        kind = chip.device_kind if chip else "TPU (target.chip not set)"
        return cls(kind=kind, count=target.num_devices, hosts=hosts, chip=chip, target=True)


@dataclass
class Preflight:
    """What the checks found, and what they built on the way."""

    cfg: TrainConfig
    devices: Devices
    problems: Problems = field(default_factory=Problems)
    skipped: list[str] = field(default_factory=list)
    """Checks not made because what they need failed (each says which and why)."""
    tokenizer: Tokenizer | None = None
    mesh: Mesh | None = None
    """The mesh as configured; checked against the devices unless `problems` says otherwise."""
    micro_batch: int | None = None
    """Rows of one micro-batch on this host."""
    shard_layout: tuple[int, int] | None = None
    """(logical shards, rows each gives a step's global batch), when they fit the batch, its
    micro-batches and the hosts (data.logical_shards)."""
    model: nn.Module | None = None
    """On the meta device: shapes and names only."""
    specs: dict[str, PartitionSpec] | None = None
    activation_specs: list[ActivationSpec] | None = None
    qkv_spec: PartitionSpec | None = None
    dispatch_spec: PartitionSpec | None = None
    """Of a mixture-of-experts model's expert buffers (torchprime/experts.py)."""
    batches: TextBatches | None = None
    """This host's data pipeline, opened (its sources read up to their first document)."""
    eval_batches: list[dict[str, Any]] | None = None
    """This host's part of the evaluation batches, cut from the held-out data (None: no
    held-out data)."""
    plan: ShardingPlan | None = None
    sequence_split: int = 1
    """Devices each row's sequence is split over: the context axis when the layers'
    activations are split over it (context parallelism), else 1."""
    activations: ActivationEstimate | None = None
    verdict: FitVerdict | None = None
    step_model: StepModel | None = None
    """The roofline of one step on the target chip (when the chip is known)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def skip(self, what: str, because: str) -> None:
        self.skipped.append(f"{what} (needs {because})")

    def error(self) -> ConfigError:
        """Every problem in one error, with the checks that could not be made."""
        lines = list(self.problems)
        if len(lines) == 1 and not self.skipped:
            return ConfigError(lines[0])
        text = f"{len(lines)} problem{'s' if len(lines) > 1 else ''}:\n  - " + "\n  - ".join(lines)
        if self.skipped:
            text += "\n  not checked until those are fixed: " + "; ".join(self.skipped)
        return ConfigError(text)

    def raise_if_problems(self) -> None:
        if self.problems:
            raise self.error()

    def memory_text(self) -> str:
        """The plan's per-device activations and the HBM verdict, as plan_only prints them."""
        lines = []
        if self.activations is not None:
            lines.append(f"activations: {describe_activations(self.activations)}")
        if self.verdict is not None:
            lines.append(self.verdict.text)
        return "\n".join(lines)


def preflight(
    cfg: TrainConfig,
    devices: Devices,
    *,
    open_data: bool = True,
    output_dir: Path | None = None,
) -> Preflight:
    """Check `cfg` for `devices`; build the meta model, the plan and (with `open_data`) this
    host's data pipeline. With `output_dir`, also check that it holds no other run."""
    pre = Preflight(cfg, devices)
    pre.problems += cfg.problems()
    if output_dir is not None:
        pre.problems.attempt(check_no_previous_run, output_dir, cfg.trainer.resume)
    _check_target(pre)
    pre.tokenizer = pre.problems.attempt(build_tokenizer, cfg.data.tokenizer)
    if pre.tokenizer is not None:
        pre.problems.check(
            pre.tokenizer.vocab_size <= cfg.model.vocab_size,
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
            f"data.tokenizer={cfg.data.tokenizer!r} ({pre.tokenizer.vocab_size}).",
        )
    _check_mesh_and_batch(pre)
    _check_model(pre)
    if open_data:
        _open_data(pre)
        _open_eval_data(pre)
    _plan(pre)
    return pre


def check_no_previous_run(output_dir: Path, resume: str = "never") -> None:
    """Refuse to write over another run's metrics or checkpoints, unless asked to resume it
    (trainer.resume=auto or a checkpoint: the run continues in place)."""
    if resume != "never":
        return
    metrics, checkpoints = output_dir / "metrics.jsonl", output_dir / "checkpoints"
    # An empty metrics.jsonl is what a run that failed before its first step left behind.
    found = [
        p.name
        for p in (metrics, checkpoints)
        if p.exists() and not (p == metrics and p.is_file() and p.stat().st_size == 0)
    ]
    if found:
        raise ConfigError(
            f"output_dir={output_dir} already holds a run ({', '.join(found)}); continue it with "
            "trainer.resume=auto, or choose another output_dir or run_name, or move that run "
            "away. Nothing was changed."
        )


def _check_target(pre: Preflight) -> None:
    """A config written for a pod (target.*) runs on that pod: the same chip count, and not
    by mistake on a CPU, where an 8B model would grind for hours before running out of memory."""
    t, d = pre.cfg.target, pre.devices
    if d.target:
        return  # checking for the target itself
    if not d.kind.startswith("TPU"):
        pre.problems.check(
            t.chip is None and t.num_devices is None,
            f"this config is for a TPU pod (target.chip={t.chip}, target.num_devices="
            f"{t.num_devices}) and the devices here are {d.kind}: check it here with "
            "dry_run=true, or clear target.chip and target.num_devices to run it on these "
            "devices anyway.",
        )
        return
    pre.problems.check(
        t.num_devices is None or d.count == t.num_devices,
        f"target.num_devices={t.num_devices}, but this pod has {d.count} chips ({d.kind}): run "
        "the config made for it, or fix the target.",
    )
    if t.chip is not None and d.chip is not None and t.chip != d.chip.name:
        log.warning(
            "target.chip=%s, but the chips here are %s: the plan's HBM verdict was for %s.",
            t.chip,
            d.kind,
            t.chip,
        )


def _check_mesh_and_batch(pre: Preflight) -> None:
    cfg = pre.cfg
    if cfg.ici_mesh.problems("ici_mesh", True) or cfg.dcn_mesh.problems("dcn_mesh", False):
        pre.skip(
            "the mesh, the batch split and the sharding specs' divisibility", "valid mesh sizes"
        )
        return
    sizes = [*vars(cfg.ici_mesh).values(), *vars(cfg.dcn_mesh).values()]
    if pre.devices.target and -1 in sizes and pre.devices.count is None:
        pre.problems.append(
            "ici_mesh has a -1 axis, which fills the pod's devices: set target.num_devices so "
            "the mesh can be checked."
        )
    mesh = pre.problems.attempt(_resolve_mesh, cfg, pre.devices)
    # A mesh that does not cover the devices still has valid sizes: the checks that depend on
    # them (batch split, sharding) go on with the mesh as configured.
    pre.mesh = mesh or resolve_mesh(cfg.ici_mesh, cfg.dcn_mesh, None)
    if mesh is not None and pre.devices.engine == "torch.distributed":
        pre.problems.attempt(check_hosts_hold_data_blocks, mesh, pre.devices)
    t = cfg.trainer
    if t.global_batch_size < 1 or t.grad_accum_steps < 1:
        pre.skip("the batch split over the mesh", "a valid trainer.global_batch_size")
        return
    pre.micro_batch = pre.problems.attempt(
        micro_batch_rows, t.global_batch_size, t.grad_accum_steps, pre.mesh, pre.devices.hosts
    )
    if pre.micro_batch is not None and not cfg.data.problems():
        pre.shard_layout = pre.problems.attempt(
            shard_layout,
            cfg.data.logical_shards,
            t.global_batch_size,
            pre.devices.hosts,
            t.grad_accum_steps,
        )


def _resolve_mesh(cfg: TrainConfig, devices: Devices) -> Mesh:
    """The mesh over `devices`; off XLA, the error says how processes map to devices."""
    try:
        return resolve_mesh(cfg.ici_mesh, cfg.dcn_mesh, devices.count)
    except ConfigError as e:
        if devices.engine == "xla":
            raise
        asked = resolve_mesh(cfg.ici_mesh, cfg.dcn_mesh, None).num_devices
        backend = "backend=" + ("cpu" if devices.kind == "CPU" else "cuda")
        if devices.engine == "eager":
            # One process, one device: the mesh is not applied (as `python train.py
            # backend=cpu` always did); the warning says how to apply it.
            log.warning(
                "%s Without torchrun, %s runs one process on one device, so the mesh is not "
                "applied: start one process per mesh device with `torchrun "
                "--nproc_per_node=%d train.py %s ...` to shard.",
                e,
                backend,
                asked,
                backend,
            )
            return Mesh((1,) * len(AXES), (1,) * len(AXES))
        raise ConfigError(
            f"{e} Under torchrun each of the {devices.count} processes is one device: start "
            f"--nproc_per_node={asked} (x nodes), or make the mesh {devices.count} devices."
        ) from None


def check_hosts_hold_data_blocks(mesh: Mesh, devices: Devices) -> None:
    """Each host (torchrun node) reads its own part of the batch, so its processes must be
    whole data-parallel blocks of the mesh (tensor and context axes inside a host)."""
    ways = mesh.size(BATCH_SPEC[0])
    if ways % devices.hosts:
        raise ConfigError(
            f"the mesh's {ways} data-parallel devices ({describe_batch_axes(mesh)}) do not split "
            "over the "
            f"{devices.hosts} hosts: each host reads its own part of the batch."
        )
    per_host = ways // devices.hosts
    for rank in range(devices.count or 0):
        host = rank // devices.local_processes
        if data_parallel_index(mesh, rank) // per_host != host:
            raise ConfigError(
                f"mesh {mesh.describe()}: rank {rank} on host {host} computes on rows another "
                "host reads; keep tensor parallelism within a host (ici_mesh) and split the "
                "hosts over data or fsdp (dcn_mesh)."
            )


def _check_model(pre: Preflight) -> None:
    cfg, problems = pre.cfg, pre.problems
    problems.attempt(get_trainer_class, cfg.trainer.name)
    if cfg.model.problems():
        pre.skip("the attention kernel, sharding, remat and lr patterns", "a valid model config")
        return
    m = cfg.model
    problems.attempt(
        check_attention_kernel,
        m.attention_kernel,
        m.attention_block_sizes,
        pre.devices.kind,
        m.is_causal,
        cfg.data.block_size,
        uses_bias=False,  # document packing hands the kernels segment ids, not a bias
    )
    pre.qkv_spec = problems.attempt(qkv_spec, m.sharding)
    pre.model = model = problems.attempt(build_model, m, cfg.resolved_precision.params)
    if model is None:
        return
    if pre.mesh is not None:
        pre.specs = problems.attempt(plan_parameter_specs, model, m.sharding, pre.mesh)
    else:
        pre.skip("the parameter specs", "a valid mesh")
    # On torch.distributed, or planned for it (plan_only with backend=cpu or cuda).
    distributed = pre.devices.engine == "torch.distributed" or (
        pre.devices.target and cfg.backend in ("cpu", "cuda")
    )
    if pre.specs is not None and distributed:
        problems.attempt(check_dtensor_specs, model, m.sharding, pre.specs, pre.mesh)
        problems.attempt(check_chunked_head, m.loss_chunk_size, pre.specs, pre.mesh)
    pre.activation_specs = problems.attempt(plan_activation_specs, model, m.sharding)
    _check_context(pre)
    _check_experts(pre)
    before = len(problems)
    problems.attempt(check_remat, model, m.remat)
    remat_ok = len(problems) == before
    opt = cfg.trainer.optimizer
    # The optimizer sees the model as the rewriting leaves it: with stacked weights, a copy
    # stacked on the meta device (an lr multiplier must then give every layer one factor).
    grouped = model
    if m.remat.stack_weights:
        grouped = _check_stacked(pre, distributed) if remat_ok else None
    if grouped is not None:
        problems.attempt(param_groups, grouped, opt.weight_decay, dict(opt.lr_multipliers))
    if m.pretrained_path:
        from models.hf import check_matches

        problems.attempt(check_matches, m, m.pretrained_path)


def _check_stacked(pre: Preflight, distributed: bool) -> nn.Module | None:
    """model.remat.stack_weights can run: not on torch.distributed, one spec for every
    layer's weight and none splitting the layer dim. Returns the model stacked on the meta
    device (None when it cannot be)."""
    m, problems = pre.cfg.model, pre.problems
    path = m.remat.scan_layers
    problems.check(
        not distributed,
        "model.remat.stack_weights=true: stacked weights run on XLA and on one eager device, "
        "not on the torch.distributed engine (torchrun with backend=cpu|cuda); set "
        "model.remat.stack_weights=false there (the scan then runs as a loop).",
    )
    problems += split_layer_dim_problem(
        m.sharding.parameters, pre.model, path, "model.sharding.parameters"
    )
    if pre.specs is not None:
        layers = list(pre.model.get_submodule(path))
        problems.attempt(layer_specs, path, layers, pre.specs, "model.sharding.parameters")
    return problems.attempt(meta_stacked, pre.model, path)


def check_chunked_head(chunk: int | None, specs: dict[str, PartitionSpec], mesh: Mesh) -> None:
    """The chunked loss multiplies by the head's weight itself: on torch.distributed a head
    split over `tensor` is a DTensor that plain chunks cannot multiply (XLA partitions it)."""
    spec = specs.get("lm_head.weight", ())
    axes = {a for entry in spec if entry for a in ([entry] if isinstance(entry, str) else entry)}
    if chunk is not None and "tensor" in axes and mesh.shape["tensor"] > 1:
        raise ConfigError(
            f"model.loss_chunk_size={chunk}: on the torch.distributed engine the chunked loss "
            f"needs lm_head.weight off the tensor axis (its spec: {list(spec)}); set "
            "model.loss_chunk_size=null, or run it on XLA."
        )


def _check_context(pre: Preflight) -> None:
    """Context parallelism (the sequence split over `context`) as configured can run."""
    cfg, m = pre.cfg, pre.cfg.model
    if pre.mesh is None or pre.activation_specs is None:
        pre.skip("context parallelism", "a valid mesh and activation specs")
        return
    stack = {id(layer) for layer in pre.model.decoder_layers}
    names = {name for name, module in pre.model.named_modules() if id(module) in stack}
    layers = [p for p in pre.activation_specs if p.index is None and p.module in names]
    split = bool(layers) and all(splits_sequence(p.spec) for p in layers)
    pre.sequence_split = context_size(pre.mesh) if split else 1
    engine = "torch.distributed" if cfg.backend in ("cpu", "cuda") else pre.devices.engine
    pre.problems += context_problems(
        pre.mesh,
        cfg.data.block_size,
        load_balance=m.load_balance_context,
        kernel=m.attention_kernel,
        qkv_spec=pre.qkv_spec,
        num_heads=m.num_attention_heads,
        engine=engine,
        sequence_split=split,
    )


def _check_experts(pre: Preflight) -> None:
    """Expert parallelism (the experts split over `expert`) as configured can run."""
    m = pre.cfg.model
    pre.dispatch_spec = pre.problems.attempt(dispatch_spec, m.sharding)
    if pre.mesh is None:
        pre.skip("expert parallelism", "a valid mesh")
        return
    pre.problems += expert_problems(pre.mesh, m, pre.dispatch_spec)


def _open_data(pre: Preflight) -> None:
    """This host's data pipeline: a missing path, an unreadable file, a missing text field or
    an empty part fails here, in seconds, before the weights are built."""
    cfg = pre.cfg
    if pre.tokenizer is None or cfg.data.problems():
        pre.skip("the data sources", "a valid data config and tokenizer")
        return
    d = pre.devices
    data = cfg.data
    if pre.micro_batch is not None and pre.shard_layout is None:
        pre.skip("the data sources", "a data.logical_shards that fits the batch and the hosts")
        return
    if pre.micro_batch is None:
        # the batch split failed (said once): check the sources with one shard a host
        data = dataclasses.replace(data, logical_shards=None)
    rows = pre.micro_batch or 1
    pre.batches = pre.problems.attempt(
        TextBatches,
        data,
        pre.tokenizer,
        rows,
        d.host_index,
        d.hosts,
        cfg.seed,
        training_holdout(cfg.eval),
        micro_batches=cfg.trainer.grad_accum_steps if pre.micro_batch is not None else 1,
    )


def eval_rows(cfg: TrainConfig) -> int:
    """Rows of one evaluation batch over all hosts and devices."""
    t = cfg.trainer
    return cfg.eval.batch_size or max(1, t.global_batch_size // max(1, t.grad_accum_steps))


def _open_eval_data(pre: Preflight) -> None:
    """The evaluation batches, cut once from the held-out data: a missing or empty source, or
    fewer batches than eval.steps, fails here."""
    cfg = pre.cfg
    if not cfg.eval.has_data:
        return
    if pre.tokenizer is None or cfg.data.problems() or cfg.eval.problems() or pre.mesh is None:
        pre.skip("the held-out data", "a valid data and eval config, tokenizer and mesh")
        return
    if cfg.eval.batch_size is None and pre.micro_batch is None:
        # a training micro-batch that does not split: said once, for training
        pre.skip("the held-out data", "a trainer.global_batch_size the mesh splits")
        return
    rows, ways, hosts = eval_rows(cfg), pre.mesh.size(BATCH_SPEC[0]), pre.devices.hosts
    if rows % ways or rows % hosts:
        key = f"eval.batch_size={cfg.eval.batch_size}"
        if cfg.eval.batch_size is None:
            key += f" (a training micro-batch, {rows} rows)"
        pre.problems.append(
            f"{key} does not split over the {ways} data-parallel devices "
            f"({describe_batch_axes(pre.mesh)}) of mesh "
            f"{pre.mesh.describe()}"
            + (f" and {hosts} hosts" if hosts > 1 else "")
            + f": it must be a multiple of {ways if rows % ways else hosts}."
        )
        return
    d = pre.devices
    pre.eval_batches = pre.problems.attempt(
        cut_eval_batches, cfg.eval, cfg.data, pre.tokenizer, rows // hosts, d.host_index, d.hosts
    )


def _plan(pre: Preflight) -> None:
    cfg = pre.cfg
    if pre.model is None or pre.specs is None or pre.mesh is None:
        return
    precision = cfg.resolved_precision
    pre.plan = make_plan(pre.model, pre.specs, pre.mesh, precision.optimizer_state)
    t = cfg.trainer
    if t.global_batch_size >= 1 and t.grad_accum_steps >= 1:
        rows = t.global_batch_size / t.grad_accum_steps / pre.mesh.size(BATCH_SPEC[0])
        remat = cfg.model.remat.activation_checkpoint_layers
        layer = listed_name(pre.model.decoder_layers[0], remat)  # the name remat knows it by
        pre.activations = estimate_activations(
            cfg.model,
            cfg.model.remat,
            pre.mesh,
            rows,
            cfg.data.block_size,
            precision.compute.itemsize,  # activations are in the compute dtype
            layer,
            sequence_split=pre.sequence_split,
            segment_ids=cfg.data.packing == "document",
        )
    hbm = target_hbm(cfg, pre.devices)
    if hbm is not None and not cfg.target.problems():
        used = pre.activations.device_bytes if pre.activations else None
        pre.verdict = fit_verdict(pre.plan, *hbm, used)
    if pre.devices.chip is not None and t.global_batch_size >= 1 and t.grad_accum_steps >= 1:
        pre.step_model = predict_step(pre.plan, step_shape(cfg, pre.model), pre.devices.chip)


def step_shape(cfg: TrainConfig, model: nn.Module) -> StepShape:
    """What the step model needs of `cfg` and its (meta) model."""
    m, block = cfg.model, cfg.data.block_size
    layer = listed_name(model.decoder_layers[0], m.remat.activation_checkpoint_layers)
    return StepShape(
        model_flops_per_token=model_flops_per_token(model, block),
        tokens_per_step=cfg.trainer.global_batch_size * block,
        micro_batches=cfg.trainer.grad_accum_steps,
        layers=m.num_hidden_layers,
        hidden=m.hidden_size,
        kv_dim=m.num_key_value_heads * m.resolved_head_dim,
        q_dim=m.num_attention_heads * m.resolved_head_dim,
        heads_over_context=m.attention_kernel in TPU_KERNELS,
        activation_bytes=cfg.resolved_precision.compute.itemsize,
        rematerialized=layer in m.remat.activation_checkpoint_layers
        or bool(m.remat.scan_layers and m.remat.offload_tensors),
        experts_per_token=getattr(m, "num_experts_per_tok", 0),
        expert_slots_per_token=expert_slots_per_token(m) if routed_per_row(m) else 0.0,
    )


def target_hbm(cfg: TrainConfig, devices: Devices) -> tuple[float, str] | None:
    """Bytes of HBM per chip and how to name it, when the config or the devices say."""
    t = cfg.target
    if t.hbm_gib is not None:
        return t.hbm_gib * 2**30, f"target.hbm_gib={t.hbm_gib:g}"
    if devices.chip is not None:
        return devices.chip.hbm_gib * 2**30, f"a TPU {devices.chip.name} chip"
    return None


def describe_activations(a: ActivationEstimate) -> str:
    text = (
        f"{format_bytes(a.kept_bytes)} kept for backward + {format_bytes(a.working_bytes)} for "
        f"one layer and the logits ({format_bytes(a.logits_bytes)})"
    )
    if a.host_bytes:
        text += f", {format_bytes(a.host_bytes)} offloaded to host memory"
    return text + f" (estimate, {a.tokens:,} tokens a device)"


def plan_report(pre: Preflight, max_rows: int = 40) -> str:
    """What plan_only prints: the plan, the memory lines, and every problem found."""
    parts: list[Any] = []
    if pre.plan is not None:
        parts.append(format_plan(pre.plan, max_rows=max_rows))
        memory = pre.memory_text()
        if memory:
            parts.append("  " + memory.replace("\n", "\n  "))
        if pre.step_model is not None:
            parts.append(format_step_model(pre.step_model))
    if pre.problems:
        parts.append(f"error: {pre.error()}")
    return "\n".join(parts)
