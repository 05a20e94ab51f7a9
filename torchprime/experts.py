"""Expert parallelism: a mixture-of-experts model's experts split over the `expert` mesh axis.

The `expert` axis splits two things. Outside the mixture-of-experts layers it is one more
data-parallel axis: the batch is split over (data, fsdp, expert) (torchprime/mesh.py
BATCH_AXES), so every device works on rows of its own. Inside them the expert weights
([experts, ...], the `moe_fsdp_ep` sharding preset) are split over `expert` on their first
dimension, so a device holds only its experts. The routing per row (models/moe_rows.py) puts
each row's tokens into fixed-size buffers, one per expert ([experts, rows x capacity,
hidden]); the model hands them and the experts' outputs to its `constrain_dispatch` seam, and
`ExpertLayout` annotates them with `model.sharding.dispatch`: split over `expert` on the
experts dimension, over the remaining batch axes on the rows. Rows split over `expert` before,
experts split over it after: the SPMD partitioner moves each buffer to the devices of its
experts with an all-to-all over `expert`, and the outputs come back the same way. No device
ever gathers another device's experts.

The model is plain PyTorch: the layout is handed to its blocks from outside
(`place_expert_layout`), as the sequence layout of context parallelism is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchprime.backend.base import Backend
from torchprime.errors import Problems
from torchprime.mesh import Mesh, PartitionSpec, axes_of

#: The seam attribute of a mixture-of-experts block: a function of the dispatched tensor.
SEAM = "constrain_dispatch"


def expert_size(mesh: Mesh) -> int:
    """Devices the experts are split over (ici x dcn)."""
    return mesh.shape["expert"]


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The mixture-of-experts blocks of `model` (those with the dispatch seam)."""
    return [m for m in model.modules() if hasattr(m, SEAM)]


def rows_spec(spec: PartitionSpec) -> PartitionSpec:
    """The expert buffers as the rows' devices hold them, before dispatch and after combine:
    `spec` with the axes of its experts dimension (0) moved to its rows dimension (1)."""
    experts = axes_of(spec[0])
    rows = tuple(a for a in axes_of(spec[1]) if a not in experts) + experts
    return (None, rows or None, *spec[2:])


@dataclass(frozen=True)
class ExpertLayout:
    """Annotates the expert buffers of a mixture-of-experts block, the model's
    `constrain_dispatch(tensor, role=None)` seam. With a role each is laid out twice, so the
    partitioner knows which way it goes: the dispatched tokens ("dispatch") as the rows'
    devices computed them, then split over the experts (an all-to-all over `expert`); the
    experts' outputs ("combine") as the experts' devices computed them, then back on the rows'
    devices (the all-to-all back). With one annotation each (a prototype) the partitioner
    all-gathered the whole batch's output gradient for the combine's backward instead.
    Without a role (the routing over the whole batch, models/moe.py) only the experts' layout
    is given: that routing's index gathers take every token to every device anyway."""

    backend: Backend
    mesh: Mesh
    spec: PartitionSpec
    """Of the buffers on the experts' devices (model.sharding.dispatch)."""

    def __call__(self, tensor: torch.Tensor, role: str | None = None) -> torch.Tensor:
        if tensor.dim() != len(self.spec):
            raise ValueError(
                f"model.sharding.dispatch has {len(self.spec)} entries, but the expert buffers "
                f"have shape {list(tensor.shape)}"
            )
        rows = rows_spec(self.spec)
        specs = {None: (self.spec,), "dispatch": (rows, self.spec), "combine": (self.spec, rows)}
        if role not in specs:
            raise ValueError(f"a dispatch seam's role is 'dispatch' or 'combine', not {role!r}")
        for spec in specs[role]:
            tensor = self.backend.shard_activation(tensor, self.mesh, spec)
        return tensor

    def __deepcopy__(self, memo: dict) -> ExpertLayout:
        return self  # immutable; a scan deep-copies its layer and must not copy the runtime


def place_expert_layout(model: nn.Module, layout: ExpertLayout) -> int:
    """Set every mixture-of-experts block's seam to `layout`; returns how many there were."""
    blocks = moe_blocks(model)
    for block in blocks:
        setattr(block, SEAM, layout)
    return len(blocks)


def expert_problems(
    mesh: Mesh,
    model_cfg: Any,
    dispatch_spec: PartitionSpec | None,
) -> Problems:
    """What stops expert parallelism as configured: an expert axis on a model without experts,
    one that does not divide the experts, no dispatch annotation. Each names its key and value."""
    found = Problems()
    n = expert_size(mesh)
    experts = getattr(model_cfg, "num_local_experts", None)
    if n > 1 and experts is None:
        found.append(
            f"ici_mesh.expert x dcn_mesh.expert = {n}: expert parallelism needs a mixture-of-"
            f"experts model, and model.name={model_cfg.name} has no experts (use a Mixtral "
            "preset, e.g. model=mixtral_8x7b, or set the expert axis to 1)."
        )
        return found
    if experts is None or n == 1:
        return found
    found.check(
        experts % n == 0,
        f"model.num_local_experts={experts} does not split over the {n} devices of the expert "
        f"axis (ici_mesh.expert x dcn_mesh.expert): use an expert axis that divides "
        f"{experts}.",
    )
    found.check(
        dispatch_spec is not None,
        f"expert axis {n} with model.sharding.dispatch=null: nothing tells the partitioner to "
        "move the tokens to their experts, so every device would gather every expert's "
        "weights; use model/sharding=moe_fsdp_ep.",
    )
    return found
