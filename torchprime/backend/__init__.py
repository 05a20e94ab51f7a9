"""Choosing the backend: the seam between the trainer and the devices it runs on.

`select_backend("auto")` picks, in order: XLA on a TPU host; under torchrun (RANK and
WORLD_SIZE set), torch.distributed on CUDA when a GPU is visible, else on the CPU; CUDA when a
GPU is visible; XLA on virtual CPU devices when torch_xla is installed (the dry run of a TPU
job, with real SPMD); plain PyTorch on the CPU otherwise. torch_xla is imported only when XLA is
picked. `cpu` and `cuda` under torchrun are the torch.distributed engine, one process per device
(torchprime/backend/distributed.py); without torchrun, one device.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path

from torchprime.backend.base import Backend
from torchprime.errors import ConfigError

log = logging.getLogger(__name__)


class BackendName(StrEnum):
    """The config's `backend`: auto picks one of the others for this machine."""

    auto = "auto"
    xla = "xla"
    cpu = "cpu"
    cuda = "cuda"


_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor


def torch_xla_installed() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def tpu_present() -> bool:
    """A TPU host, told without importing torch_xla (which may not be installed)."""
    if os.environ.get("PJRT_DEVICE", "").upper() == "TPU":
        return True
    for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_file) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def under_torchrun() -> bool:
    """Whether this process is one of a job's processes started by torchrun (or a launcher
    setting the same variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_backend_name(requested: str) -> str:
    """The concrete backend `requested` means on this machine, checked to be usable."""
    if requested not in BackendName.__members__:
        raise ConfigError(f"backend={requested!r}: choose one of {', '.join(BackendName)}.")
    if requested == "auto":
        if tpu_present() and torch_xla_installed():
            return "xla"
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if under_torchrun():
            return "cpu"
        return "xla" if torch_xla_installed() else "cpu"
    if requested == "xla" and not torch_xla_installed():
        raise ConfigError(
            "backend=xla, but torch_xla is not installed: install the project's `xla` extra "
            "(pip install -e '.[xla]') or run with backend=cpu."
        )
    if requested == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "backend=cuda, but no CUDA device is visible (NCCL needs one GPU per process): "
                "use backend=cpu (gloo under torchrun)."
            )
    return requested


def select_backend(requested: str, cpu_devices: int, hlo_dump_dir: Path | None = None) -> Backend:
    """Create the backend. `cpu_devices` is how many virtual devices XLA gets when it runs on
    the CPU (ignored on TPU, where the chips are counted, and on eager backends).
    `hlo_dump_dir`: XLA dumps every module it compiles there, as text, before and after
    optimization (after: the per-device program, SPMD-partitioned)."""
    name = resolve_backend_name(requested)
    if name != "xla" and under_torchrun():
        from torchprime.backend.distributed import DistributedBackend

        return DistributedBackend(name)
    if name != "xla":
        from torchprime.backend.eager import EagerBackend

        return EagerBackend(name)
    if "torch_xla" not in sys.modules:
        # torch_xla reads these once, at import; a value the user set wins.
        os.environ.setdefault("PJRT_DEVICE", "TPU" if tpu_present() else "CPU")
        if os.environ["PJRT_DEVICE"] == "CPU":
            os.environ.setdefault("CPU_NUM_DEVICES", str(cpu_devices))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ info and warning chatter
        if hlo_dump_dir is not None:
            flags = f"--xla_dump_to={hlo_dump_dir} --xla_dump_hlo_as_text"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    elif hlo_dump_dir is not None:
        log.warning("debug.dump_hlo: the XLA runtime is already running; its own dumps are off")
    from torchprime.backend.xla import XlaBackend

    return XlaBackend()
