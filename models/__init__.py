"""Models by name: `model.name` in the config picks the class and its config schema.

Each model preset (configs/model/) sets `name` and, for a family other than Llama (the run
schema's default), composes that family's schema first (`mixtral_schema`, registered by
`register_model_schemas`), so the family's own keys are typed and checked and a key of another
family is refused with its name.
"""

from __future__ import annotations

import torch
from torch import nn

from models.llama import LlamaConfig, LlamaForCausalLM
from models.mixtral import MixtralForCausalLM
from torchprime.errors import ConfigError

#: name → model class; each takes its `config_class` and has `init_weights(generator)`.
MODELS: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mixtral": MixtralForCausalLM,
}


def register_model_schemas() -> None:
    """Every family's config schema as the Hydra option `model/<name>_schema`, for presets
    to compose (the Llama schema is the run schema's default and needs none)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, cls in MODELS.items():
        if cls.config_class is not LlamaConfig:
            store.store(group="model", name=f"{name}_schema", node=cls.config_class)


def build_model(cfg: LlamaConfig, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device: shapes and names only, no memory, parameters in `dtype`.

    torchprime.materialize turns it into device tensors module by module, each initialized on
    the host and sent already sharded, so a large model is never whole on one device; small
    models (tests, tools) may simply `to_empty(device=...)` and `init_weights(generator)`.
    """
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name={cfg.name!r}: known models are {', '.join(MODELS)}.")
    cls = MODELS[cfg.name]
    if not isinstance(cfg, cls.config_class):
        raise ConfigError(
            f"model.name={cfg.name!r} needs the {cls.config_class.__name__} schema, not "
            f"{type(cfg).__name__}: choose the model with a preset (model=PRESET)."
        )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters in the model dtype; buffers choose their own
    try:
        with torch.device("meta"):
            return cls(cfg)
    finally:
        torch.set_default_dtype(previous)
