"""Hugging Face Llama and Mixtral folders in and out: start pretraining from a released
checkpoint, and hand a trained model to `transformers` (and everything built on it) for
evaluation and serving.

A folder holds `config.json` and safetensors weights, either one `model.safetensors` or shards
listed by `model.safetensors.index.json`. Our parameter names are HF's and RoPE uses HF's
rotate_half layout, so tensors map one to one by name with no permutation; Mixtral's experts
are stored per expert in folders and fused in the model (models/hf_mixtral.py).

Loading goes through `torchprime.materialize`: each module reads only its own tensors from the
files, on the host, and sends them to the devices already sharded, so a large checkpoint is never
held whole in memory or on one device.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models import build_model
from models.hf_mixtral import moe_hf_fields, per_expert_sources, read_moe_fields, to_per_expert
from models.llama import LlamaConfig, LlamaForCausalLM, RopeScalingConfig
from models.mixtral import MixtralConfig
from torchprime.backend import select_backend
from torchprime.backend.base import Backend
from torchprime.errors import ConfigError
from torchprime.materialize import materialize
from torchprime.mesh import Mesh, MeshAxesConfig, resolve_mesh
from torchprime.sharding import ShardingConfig, plan_parameter_specs

PathLike = str | Path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

#: config.json keys with no default: a Llama config without one of them is not a Llama config.
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


#: config.json model_type → our config schema.
FAMILIES: dict[str, type[LlamaConfig]] = {"llama": LlamaConfig, "mixtral": MixtralConfig}


def read_hf_config(path: PathLike) -> LlamaConfig:
    """The architecture of the HF Llama or Mixtral folder (or config.json file) at `path`
    (a MixtralConfig for a Mixtral, with dropless routing: HF's computation).

    RoPE settings are read in both layouts: transformers 4 (`rope_theta`, and `rope_scaling` with
    `rope_type` or the older `type`) and transformers 5 (`rope_parameters`, with `rope_theta`
    inside). Anything our Llama does not compute the same way (another model_type, a RoPE type
    other than default and llama3, linear biases, an activation other than SiLU) is a
    ConfigError naming the key and the file, rather than a model that silently differs.
    """
    file = Path(path) / CONFIG_FILE if Path(path).is_dir() else Path(path)
    try:
        raw: dict[str, Any] = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file (an HF model folder has a config.json).") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e}).") from None

    family = FAMILIES.get(raw.get("model_type"))
    if family is None:
        raise ConfigError(
            f"{file}: model_type={raw.get('model_type')!r}; only Llama and Mixtral checkpoints "
            f"(model_type {' or '.join(map(repr, FAMILIES))}) can be loaded."
        )
    missing = [key for key in _REQUIRED_KEYS if raw.get(key) is None]
    if missing:
        raise ConfigError(f"{file}: missing {', '.join(missing)}.")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key, False):
            raise ConfigError(f"{file}: {key}={raw[key]!r}; our Llama has no linear biases.")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{file}: hidden_act={raw['hidden_act']!r}; only 'silu' is supported.")

    heads = raw["num_attention_heads"]
    max_positions = raw.get("max_position_embeddings", 2048)  # HF's defaults for absent keys
    rope_theta, rope_scaling = _read_rope(raw, file, max_positions)
    moe = read_moe_fields(raw, file) if family is MixtralConfig else {}
    cfg = family(
        **moe,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim"),
        max_position_embeddings=max_positions,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        initializer_range=raw.get("initializer_range", 0.02),
    )
    try:
        cfg.validate(key="config")
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return cfg


def _read_rope(
    raw: dict[str, Any], file: Path, max_positions: int
) -> tuple[float, RopeScalingConfig | None]:
    """(rope_theta, llama3 scaling or None) from either config layout."""
    # transformers itself lets a legacy `rope_scaling` win over `rope_parameters`.
    key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    rope: dict[str, Any] = dict(raw.get(key) or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(f"{file}: {key} is per layer type; Llama has one RoPE for all layers.")
    theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{file}: partial_rotary_factor is not supported (RoPE on every dim).")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(
            f"{file}: {key}.rope_type={rope_type!r}; supported RoPE types are default and llama3."
        )
    absent = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
    if absent:
        raise ConfigError(f"{file}: {key} of rope_type llama3 lacks {', '.join(absent)}.")
    return theta, RopeScalingConfig(
        rope_type="llama3",
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        # transformers falls back to max_position_embeddings when it is absent; so do we.
        original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", max_positions)
        ),
    )


class HfWeightsInit:
    """A `materialize` init that fills parameters from an HF folder's safetensors files.

    Call `check_all_used()` once the model is materialized: the files may hold tensors the
    model has no place for (a different architecture, a typo in a name), which would otherwise
    be dropped without a word.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.file_of = _tensor_files(self.path)  # tensor name → the safetensors file holding it
        self.used: set[str] = set()
        # A tied LM head is the embedding: some exporters still save a copy of it, which we
        # ignore as transformers does. RoPE frequencies are recomputed, never read: old
        # checkpoints saved them as buffers.
        self.ignored = {n for n in self.file_of if n.endswith("rotary_emb.inv_freq")}
        if read_hf_config(self.path).tie_word_embeddings:
            self.ignored.add("lm_head.weight")

    @torch.no_grad()
    def __call__(self, name: str, module: nn.Module, generator: torch.Generator) -> None:
        """Fill what `module` holds directly; `generator` is unused (nothing is random)."""
        if any(b is not None for b in module._buffers.values()):
            # Buffers are not in checkpoints (RoPE frequencies): the module recomputes them.
            if not hasattr(module, "init_weights"):
                raise ConfigError(
                    f"{self.path}: module {name!r} holds buffers that checkpoints do not carry "
                    f"and has no init_weights() to compute them."
                )
            module.init_weights()
        for key, param in module._parameters.items():
            if param is not None:
                full_name = f"{name}.{key}" if name else key
                param.copy_(self._read(full_name, tuple(param.shape)).to(param.dtype))
                self.used.add(full_name)

    def _read(self, name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        """The tensor `name` of the files, checked to have `shape` (None: any); a Mixtral
        tensor the folder stores per expert is joined from its parts."""
        if name not in self.file_of and (per_expert := per_expert_sources(name, shape)):
            names, join = per_expert
            if all(n in self.file_of for n in names):
                self.used.update(names)
                return join([self._read(n, None) for n in names])
        if name not in self.file_of:
            raise ConfigError(
                f"{self.path}: tensor {name} (shape {list(shape)}) is missing from the "
                f"checkpoint's safetensors files."
            )
        file = self.file_of[name]
        with safe_open(file, framework="pt") as f:
            found = tuple(f.get_slice(name).get_shape())  # the header only, no data read
            if shape is not None and found != shape:
                raise ConfigError(
                    f"{file}: tensor {name} has shape {list(found)}, the model expects "
                    f"{list(shape)} (does config.json match the weights?)."
                )
            return f.get_tensor(name)

    def check_all_used(self) -> None:
        """ConfigError listing the tensors of the files that no parameter was loaded from."""
        unused = sorted(set(self.file_of) - self.used - self.ignored)
        if unused:
            shown = ", ".join(unused[:10])
            if len(unused) > 10:
                shown += f" and {len(unused) - 10} more"
            raise ConfigError(
                f"{self.path}: {len(unused)} tensors of the checkpoint are not used by the "
                f"model: {shown}."
            )


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name → file, from the shard index when there is one, else the single file."""
    index = path / WEIGHTS_INDEX_FILE
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {name: path / shard for name, shard in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.exists():
                raise ConfigError(f"{index}: lists {file.name}, which is not in the folder.")
        return files
    single = path / WEIGHTS_FILE
    if not single.exists():
        raise ConfigError(
            f"{path}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}; only safetensors "
            f"checkpoints are read (convert .bin files with transformers first)."
        )
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def hf_weights_init(path: PathLike) -> HfWeightsInit:
    """The `materialize` init that loads the HF folder at `path` (see `HfWeightsInit`)."""
    return HfWeightsInit(path)


def load_hf(
    path: PathLike,
    dtype: torch.dtype = torch.float32,
    backend: Backend | None = None,
    mesh: Mesh | None = None,
    sharding: ShardingConfig | None = None,
) -> LlamaForCausalLM:
    """Our Llama or Mixtral with the weights of the HF folder at `path`, cast to `dtype`, placed by
    `backend` on `mesh` as `sharding` says (replicated when None). Defaults: the CPU backend and
    a one-device mesh. Raises ConfigError for an unsupported config and for missing, misshapen
    or unused tensors."""
    cfg = read_hf_config(path)
    if sharding is not None:
        cfg.sharding = sharding
    backend = backend or select_backend("cpu", cpu_devices=1)
    mesh = mesh or resolve_mesh(MeshAxesConfig(), MeshAxesConfig(), None)
    model = build_model(cfg, dtype)
    specs = plan_parameter_specs(model, cfg.sharding, mesh)
    weights = hf_weights_init(path)
    materialize(model, specs, mesh, backend, weights, torch.Generator())
    weights.check_all_used()
    return model


def save_hf(
    model: LlamaForCausalLM,
    path: PathLike,
    dtype: torch.dtype | None = None,
    to_host: Callable[[torch.Tensor], torch.Tensor] | None = None,
    write: bool = True,
) -> None:
    """Write `model` as an HF Llama or Mixtral folder: `config.json` and one
    `model.safetensors`, which `transformers.LlamaForCausalLM` (`MixtralForCausalLM`)
    `.from_pretrained(path)` loads with no missing or unexpected keys; Mixtral's experts are
    written per expert, as transformers writes them. `dtype`: the saved dtype (default: the
    parameters' own).

    Every parameter is gathered whole to the host (`.cpu()`), one at a time, so this suits
    models that fit in host memory on a single host. On XLA, the caller first finishes the
    pending step (`backend.sync()`) and waits for it (`backend.wait_device_ops()`), so the
    saved values are those of the last step, not of a half-run graph. `to_host` gathers one
    parameter to the host (`Backend.host_copy`: where parameters are split over processes every
    process calls this, and only the one with `write` writes the folder).
    """
    cfg = model.config
    path = Path(path)
    to_host = to_host or (lambda t: t.detach().cpu())
    dtype = dtype or next(model.parameters()).dtype
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # HF ties it to the embedding on load; saving it would be a duplicate
        # Cast after the move: on XLA a cast on the device would build and run another graph.
        whole = to_host(param)
        if write:  # the others only took part in the gathering
            for hf_name, tensor in to_per_expert(name, whole.to(dtype)).items():
                tensors[hf_name] = tensor.contiguous()
    if not write:
        return
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})

    scaling = cfg.rope_scaling
    dtype_name = str(dtype).removeprefix("torch.")
    family = "mixtral" if isinstance(cfg, MixtralConfig) else "llama"
    hf_config = {
        "architectures": [f"{family.capitalize()}ForCausalLM"],
        "model_type": family,
        **(moe_hf_fields(cfg) if isinstance(cfg, MixtralConfig) else {}),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # The transformers 4 layout, which transformers 5 still reads (as `rope_parameters`).
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None
        if scaling is None
        else {
            "rope_type": scaling.rope_type,
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        },
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": dtype_name,  # transformers 4's name for it
        "dtype": dtype_name,  # transformers 5's
    }
    (path / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")


#: Fields that decide the computation: a checkpoint must agree with the config on all of them.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "resolved_head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
)


def check_matches(cfg: LlamaConfig, path: PathLike, key: str = "model") -> None:
    """ConfigError listing every architecture field where `cfg` and the folder's config.json
    disagree (training would otherwise start from weights meant for another model)."""
    saved = read_hf_config(path)
    if type(saved) is not type(cfg):
        raise ConfigError(
            f"{key}.pretrained_path={str(path)!r} holds a {saved.name} checkpoint "
            f"({Path(path) / CONFIG_FILE}), but {key}.name={cfg.name!r}. Choose a {saved.name} "
            "preset."
        )
    fields = ARCHITECTURE_FIELDS
    if isinstance(cfg, MixtralConfig):
        fields += ("num_local_experts", "num_experts_per_tok")
    differences = [
        f"{key}.{name.removeprefix('resolved_')}={getattr(cfg, name)!r} but the checkpoint has "
        f"{getattr(saved, name)!r}"
        for name in fields
        if getattr(cfg, name) != getattr(saved, name)
    ]
    if differences:
        raise ConfigError(
            f"{key}.pretrained_path={str(path)!r} holds another architecture: "
            + "; ".join(differences)
            + ". Choose the matching model preset."
        )
