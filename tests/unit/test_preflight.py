"""The pre-flight every mode runs: every problem at once, and what it could not check."""

from __future__ import annotations

import pytest

from run.preflight import Devices, preflight
from torchprime.backend import select_backend
from torchprime.chips import ChipName
from torchprime.errors import ConfigError
from torchprime.mesh import MeshAxesConfig
from train_config import TargetConfig, TrainConfig

CPU = Devices.of_backend(select_backend("cpu", cpu_devices=1))  # one device, no torchrun


def one_device(cfg: TrainConfig) -> TrainConfig:
    cfg.ici_mesh = MeshAxesConfig(fsdp=1)
    return cfg


def test_a_pod_config_does_not_start_on_other_devices():
    """An 8B model on a laptop CPU would grind for hours before running out of memory."""
    cfg = one_device(TrainConfig(target=TargetConfig(chip=ChipName.v5p, num_devices=64)))
    pre = preflight(cfg, CPU, open_data=False)
    assert len(pre.problems) == 1
    assert "target.chip=v5p" in pre.problems[0] and "devices here are CPU" in pre.problems[0]
    assert "dry_run=true" in pre.problems[0]
    assert preflight(one_device(TrainConfig()), CPU, open_data=False).ok  # no target


def test_a_mesh_that_misses_the_devices_still_checks_the_batch_and_the_specs():
    cfg = TrainConfig()
    cfg.ici_mesh.fsdp = 8
    cfg.trainer.global_batch_size = 12
    cfg.model.sharding.parameters = {"lm_haed.weight": ["fsdp", None]}
    pre = preflight(cfg, Devices(kind="CPU", count=4), open_data=False)
    assert [p.split(" ")[0] for p in pre.problems] == [
        "ici_mesh",
        "trainer.global_batch_size=12",
        "model.sharding.parameters['lm_haed.weight']",
    ]
    assert pre.mesh.describe() == "fsdp=8"  # the mesh as configured, for the checks after it


def test_a_multi_device_mesh_on_one_eager_device_runs_unsharded_and_names_torchrun(caplog):
    pre = preflight(TrainConfig(backend="cpu"), CPU, open_data=False)  # fsdp=4
    assert not pre.problems and pre.mesh.num_devices == 1
    assert "torchrun --nproc_per_node=4 train.py backend=cpu" in caplog.text


def test_checks_that_need_a_valid_model_are_skipped_and_named():
    cfg = one_device(TrainConfig())
    cfg.model.num_key_value_heads = 3
    cfg.trainer.optimizer.lr_multipliers = {"lm_haed.weight": 0.5}
    pre = preflight(cfg, CPU, open_data=False)
    assert pre.problems == [
        "model.num_attention_heads=4 is not a multiple of model.num_key_value_heads=3."
    ]
    with pytest.raises(ConfigError) as e:
        pre.raise_if_problems()
    assert (
        "not checked until those are fixed: the attention kernel, sharding, remat and lr "
        "patterns (needs a valid model config)" in str(e.value)
    )


def test_the_target_pod_gives_the_devices_hosts_and_hbm():
    pod = Devices.of_target(TargetConfig(chip=ChipName.v5p, num_devices=64))
    assert (pod.kind, pod.count, pod.hosts, pod.chip.hbm_gib) == ("TPU v5p", 64, 16, 95.0)
    cfg = TrainConfig(target=TargetConfig(chip=ChipName.v5p, num_devices=64))
    cfg.ici_mesh.fsdp = 64
    cfg.trainer.global_batch_size = 64
    pre = preflight(cfg, pod, open_data=False)
    assert pre.ok and pre.micro_batch == 4  # 64 rows over 16 hosts
    assert pre.verdict.fits and "on a TPU v5p chip" in pre.verdict.text


@pytest.mark.parametrize(
    "shards, problem",
    [
        (8, "data.logical_shards=8 does not split over the 16 hosts: each host reads whole"),
        (48, "data.logical_shards=48: a global batch of 64 rows"),
    ],
)
def test_logical_shards_that_cannot_feed_the_pods_hosts_are_refused(shards, problem):
    target = TargetConfig(chip=ChipName.v5p, num_devices=64)  # 16 hosts
    cfg = TrainConfig(target=target)
    cfg.ici_mesh.fsdp = 64
    cfg.trainer.global_batch_size = 64
    cfg.data.logical_shards = shards
    pre = preflight(cfg, Devices.of_target(target), open_data=False)
    assert len(pre.problems) == 1 and pre.problems[0].startswith(problem)
    cfg.data.logical_shards = 16  # or null: 64, a shard a row
    assert preflight(cfg, Devices.of_target(target), open_data=False).ok
