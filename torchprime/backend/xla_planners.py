"""torch_xla's distributed checkpoint planners, with partly replicated tensors kept.

torch_xla 2.9's SPMDSavePlanner writes one item per local shard. A tensor split over some
mesh axes and replicated over others (a norm weight split over fsdp on an fsdp x tensor
mesh, any parameter split over fsdp on a data x fsdp mesh) has several local shards at the
same offset; the global plan's deduplication then removes every copy, and the tensor is
silently missing from the checkpoint. Keeping one item per offset in the local plan avoids it.
"""

from __future__ import annotations

import dataclasses

from torch.distributed.checkpoint.planner import SavePlan
from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner


class SavePlanner(SPMDSavePlanner):
    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        seen: set[tuple] = set()
        items = []
        for item in plan.items:
            offset = item.index.offset
            key = (item.index.fqn, None if offset is None else tuple(offset))
            if key not in seen:
                seen.add(key)
                items.append(item)
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan
