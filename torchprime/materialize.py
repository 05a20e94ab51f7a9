"""From a model on the meta device to its weights on the device, already sharded.

One module at a time: its parameters are created and initialized on the host, then sent to the
devices as shards (each device receives only its part). Neither the host nor any device ever
holds the whole model unsharded, and the weights are the same numbers on every backend because
they are drawn on the host from one seeded generator, in a fixed order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from torchprime.backend.base import Backend
from torchprime.mesh import Mesh, PartitionSpec

#: init(module name, module, generator) fills the parameters and buffers the module holds
#: directly, in place, on the host.
ModuleInit = Callable[[str, nn.Module, torch.Generator], None]


def materialize(
    model: nn.Module,
    specs: dict[str, PartitionSpec],
    mesh: Mesh,
    backend: Backend,
    init: ModuleInit,
    generator: torch.Generator,
) -> None:
    """Replace every meta parameter and buffer of `model` by an initialized device tensor laid
    out as `specs` says (names as in `model.named_parameters()`). Tied parameters stay tied.
    Parameters the backend already laid out (`Backend.parallelize`) get their values in place."""
    placed: dict[int, nn.Parameter] = {}  # id of the meta parameter → its device parameter
    for name, module in model.named_modules():
        fresh: dict[str, nn.Parameter] = {}
        for key, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in placed:  # tied to a parameter an earlier module owns
                module._parameters[key] = placed[id(param)]
                continue
            host = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad
            )
            module._parameters[key] = host
            fresh[key] = param
        buffers = [key for key, b in module._buffers.items() if b is not None]
        for key in buffers:
            b = module._buffers[key]
            module._buffers[key] = torch.empty(b.shape, dtype=b.dtype)
        if not fresh and not buffers:
            continue
        init(name, module, generator)
        for key, meta_param in fresh.items():
            host = module._parameters[key]
            full_name = f"{name}.{key}" if name else key
            device_param = backend.place_parameter(meta_param, host, mesh, specs[full_name])
            module._parameters[key] = device_param
            placed[id(meta_param)] = device_param
        for key in buffers:
            b = module._buffers[key]
            module._buffers[key] = backend.place(b, mesh, (None,) * b.dim())
