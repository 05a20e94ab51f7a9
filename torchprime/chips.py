"""The accelerator chips a config can target: one table for peak FLOP/s (mfu), HBM (the plan's
verdict) and chips per host (the batch split over hosts). Figures are Cloud TPU's published
per-chip system specs (cloud.google.com/tpu/docs/system-architecture-tpu-vm and the v4, v5e,
v5p and v6e pages): dense bfloat16 peak, HBM capacity."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ChipName(StrEnum):
    v4 = "v4"
    v5e = "v5e"
    v5p = "v5p"
    v6e = "v6e"


@dataclass(frozen=True)
class Chip:
    name: ChipName
    peak_flops: float
    """Dense bfloat16 FLOP/s of one chip."""
    hbm_gib: float
    """High-bandwidth memory of one chip."""
    chips_per_host: int = 4
    """Chips per TPU VM host on multi-host slices."""

    @property
    def device_kind(self) -> str:
        """How the XLA backend names these devices (`backend.device_kind`)."""
        return f"TPU {self.name}"


CHIPS: dict[ChipName, Chip] = {
    ChipName.v4: Chip(ChipName.v4, peak_flops=275e12, hbm_gib=32.0),
    ChipName.v5e: Chip(ChipName.v5e, peak_flops=197e12, hbm_gib=16.0),
    ChipName.v5p: Chip(ChipName.v5p, peak_flops=459e12, hbm_gib=95.0),
    ChipName.v6e: Chip(ChipName.v6e, peak_flops=918e12, hbm_gib=32.0),
}


def chip_of(device_kind: str) -> Chip | None:
    """The chip `backend.device_kind` names ("TPU v5p"), or None (a CPU, a GPU)."""
    return next((c for c in CHIPS.values() if c.device_kind == device_kind), None)
