"""The accelerator chips a config can target: one table for peak FLOP/s (mfu), HBM (the plan's
verdict), chips per host (the batch split over hosts) and the bandwidths the step model
(torchprime/step_model.py) divides by.

Figures are Cloud TPU's published per-chip specs, from the "System architecture" tables of
cloud.google.com/tpu/docs/v4, /v5e, /v5p and /v6e: dense bfloat16 peak, HBM capacity and
bandwidth, bidirectional inter-chip interconnect (ICI) bandwidth per chip. Data-center network
(DCN) bandwidth per chip: v5p's page gives 50 Gbps; v5e's gives 6.4 Tbps per 256-chip pod
(25 Gbps a chip). A figure the pages do not give is None, and the step model says what it
could not compute without it."""

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
    hbm_bandwidth: float | None = None
    """Bytes/s between one chip and its HBM."""
    ici_bandwidth: float | None = None
    """Bytes/s in and out of one chip over the inter-chip interconnect (all links, both ways)."""
    dcn_bandwidth: float | None = None
    """Bytes/s of one chip's share of its host's data-center network."""

    @property
    def device_kind(self) -> str:
        """How the XLA backend names these devices (`backend.device_kind`)."""
        return f"TPU {self.name}"


GB = 1e9

CHIPS: dict[ChipName, Chip] = {
    ChipName.v4: Chip(ChipName.v4, peak_flops=275e12, hbm_gib=32.0, hbm_bandwidth=1200 * GB),
    ChipName.v5e: Chip(
        ChipName.v5e,
        peak_flops=197e12,
        hbm_gib=16.0,
        hbm_bandwidth=819 * GB,
        ici_bandwidth=400 * GB,
        dcn_bandwidth=25e9 / 8,
    ),
    ChipName.v5p: Chip(
        ChipName.v5p,
        peak_flops=459e12,
        hbm_gib=95.0,
        hbm_bandwidth=2765 * GB,
        ici_bandwidth=1200 * GB,
        dcn_bandwidth=50e9 / 8,
    ),
    ChipName.v6e: Chip(
        ChipName.v6e,
        peak_flops=918e12,
        hbm_gib=32.0,
        hbm_bandwidth=1638 * GB,
        ici_bandwidth=800 * GB,
    ),
}


def chip_of(device_kind: str) -> Chip | None:
    """The chip `backend.device_kind` names ("TPU v5p"), or None (a CPU, a GPU)."""
    return next((c for c in CHIPS.values() if c.device_kind == device_kind), None)
