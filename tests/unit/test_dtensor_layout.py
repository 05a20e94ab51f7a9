"""What the sharding specs mean on the torch.distributed engine: FSDP2 shard dimensions and
tensor-parallel styles, and the specs that have no meaning there (errors naming the pattern)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from models import build_model
from models.llama import LlamaConfig
from torchprime.backend.distributed import tensor_parallel_plan
from torchprime.dtensor_layout import ParamLayout, check_dtensor_specs, layouts
from torchprime.errors import ConfigError
from torchprime.mesh import MeshAxesConfig, resolve_mesh
from torchprime.sharding import ShardingConfig, plan_parameter_specs


def sharding(**overrides) -> ShardingConfig:
    from conftest import composed

    specs = dict(composed("model/sharding=fsdp_tp").model.sharding.parameters)
    specs.update(overrides)
    return ShardingConfig(parameters=specs)


def meta_model():
    with torch.device("meta"):
        return build_model(LlamaConfig(), torch.float32)


def mesh(**axes):
    return resolve_mesh(MeshAxesConfig(**axes), MeshAxesConfig(), None)


def test_fsdp_and_tensor_dimensions_come_from_the_specs():
    model, m = meta_model(), mesh(fsdp=2, tensor=2)
    found = layouts(model, plan_parameter_specs(model, sharding(), m), m)
    assert found["model.layers.0.self_attn.q_proj.weight"] == ParamLayout(fsdp_dim=1, tensor_dim=0)
    assert found["model.layers.0.self_attn.o_proj.weight"] == ParamLayout(fsdp_dim=0, tensor_dim=1)
    assert found["model.embed_tokens.weight"] == ParamLayout(fsdp_dim=0, tensor_dim=1)
    assert found["model.norm.weight"] == ParamLayout(fsdp_dim=0, tensor_dim=None)


def test_column_parallel_outputs_stay_split_only_into_a_row_parallel_sibling():
    model, m = meta_model(), mesh(fsdp=2, tensor=2)
    plan = tensor_parallel_plan(
        model, layouts(model, plan_parameter_specs(model, sharding(), m), m)
    )
    q, o = plan["model.layers.0.self_attn.q_proj"], plan["model.layers.0.self_attn.o_proj"]
    assert type(q) is ColwiseParallel and type(o) is RowwiseParallel
    assert q.output_layouts[0].is_shard(-1) and o.input_layouts[0].is_shard(-1)
    head, embed = plan["lm_head"], plan["model.embed_tokens"]
    assert type(head) is ColwiseParallel and head.output_layouts[0].is_replicate()
    assert type(embed) is ColwiseParallel and embed.output_layouts[0].is_replicate()
    assert "model.norm" not in plan


@pytest.mark.parametrize(
    ("override", "axes", "message"),
    [
        (
            {"model.norm.weight": ["tensor"]},
            {"tensor": 2, "fsdp": 2},
            "splits Linear and Embedding",
        ),
        (
            {"lm_head.weight": [["fsdp", "tensor"], None]},
            {"tensor": 2, "fsdp": 2},
            "split over tensor and fsdp together",
        ),
        ({"lm_head.weight": [["data", "fsdp"], None]}, {"data": 2, "fsdp": 2}, "write `fsdp`"),
        ({"lm_head.weight": [None, None]}, {"fsdp": 4}, "not split over fsdp"),
    ],
)
def test_a_spec_without_a_dtensor_meaning_names_its_pattern(override, axes, message):
    model, m, cfg = meta_model(), mesh(**axes), sharding(**override)
    specs = plan_parameter_specs(model, cfg, m)
    with pytest.raises(ConfigError) as e:
        check_dtensor_specs(model, cfg, specs, m)
    pattern = next(iter(override))
    assert f"model.sharding.parameters[{pattern!r}]" in str(e.value) and message in str(e.value)


def test_axes_of_one_device_split_nothing():
    model, m = meta_model(), mesh(fsdp=1)
    check_dtensor_specs(model, sharding(), plan_parameter_specs(model, sharding(), m), m)
