"""Choosing the backend."""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_XLA
from torchprime.backend import resolve_backend_name, select_backend
from torchprime.errors import ConfigError


def test_auto_picks_xla_on_virtual_cpu_devices_when_torch_xla_is_installed():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: auto picks cuda")
    assert resolve_backend_name("auto") == ("xla" if HAS_XLA else "cpu")


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ConfigError, match=r"backend='tpu': choose one of auto, xla, cpu, cuda"):
        resolve_backend_name("tpu")


def test_cuda_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match=r"no CUDA device is visible \(NCCL needs one GPU"):
        resolve_backend_name("cuda")


def test_auto_under_torchrun_picks_the_distributed_engine_on_the_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: auto picks cuda")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_backend_name("auto") == "cpu"


def test_a_process_group_that_cannot_start_says_how_to_launch(monkeypatch):
    # torchrun's rank and world size, but no rendezvous address.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError) as e:
        select_backend("cpu", cpu_devices=1)
    assert "backend=cpu: the gloo process group could not start (ValueError" in str(e.value)
    assert "torchrun --nproc_per_node=N train.py backend=cpu" in str(e.value)


def test_the_cpu_backend_is_one_plain_device():
    backend = select_backend("cpu", cpu_devices=8)
    assert not backend.is_xla and backend.device_count == 1
    assert backend.device == torch.device("cpu") and backend.compile_count() is None
    ran = []
    backend.add_step_closure(ran.append, (1,))
    assert ran == [1]  # eager: at once
