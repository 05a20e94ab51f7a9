"""The Mixtral parts of an HF folder: its config.json fields and its expert tensors.

transformers 5 computes with fused expert tensors (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I], the router `mlp.gate.weight`), which are our names, but
writes and reads folders in the per-expert layout of transformers 4 and of the released
checkpoints: `block_sparse_moe.gate.weight`, `block_sparse_moe.experts.N.w1.weight` (gate
[I, H]), `.w3.weight` (up [I, H]), `.w2.weight` (down [H, I]). Both layouts are read; the
per-expert one is written, so `transformers.MixtralForCausalLM.from_pretrained` loads it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchprime.errors import ConfigError

_EXPERTS = re.compile(r"^(?P<layer>.+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(?P<layer>.+)\.mlp\.gate\.weight$")


def read_moe_fields(raw: dict[str, Any], file: Path) -> dict[str, Any]:
    """MixtralConfig's expert fields from an HF Mixtral config.json; a setting our model does
    not compute the same way is a ConfigError naming the key and the file."""
    if raw.get("sliding_window") is not None:
        raise ConfigError(
            f"{file}: sliding_window={raw['sliding_window']}; sliding-window attention is not "
            "implemented (null: full causal attention)."
        )
    if raw.get("router_jitter_noise", 0.0):
        raise ConfigError(
            f"{file}: router_jitter_noise={raw['router_jitter_noise']}; router jitter is not "
            "implemented (0: none)."
        )
    return {
        "num_local_experts": raw.get("num_local_experts", 8),  # transformers' defaults
        "num_experts_per_tok": raw.get("num_experts_per_tok", 2),
        "router_aux_loss_coef": raw.get("router_aux_loss_coef", 0.001),
    }


def moe_hf_fields(cfg: Any) -> dict[str, Any]:
    """The config.json fields of a MixtralConfig beyond Llama's."""
    return {
        "num_local_experts": cfg.num_local_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
    }


def to_per_expert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our tensor `name` as the HF folder names it (per-expert tensors for the experts)."""
    if m := _ROUTER.match(name):
        return {f"{m['layer']}.block_sparse_moe.gate.weight": tensor}
    if not (m := _EXPERTS.match(name)):
        return {name: tensor}
    prefix = f"{m['layer']}.block_sparse_moe.experts"
    out = {}
    for e in range(tensor.shape[0]):
        if m["kind"] == "down_proj":
            out[f"{prefix}.{e}.w2.weight"] = tensor[e]
        else:
            gate, up = tensor[e].chunk(2, dim=0)
            out[f"{prefix}.{e}.w1.weight"] = gate
            out[f"{prefix}.{e}.w3.weight"] = up
    return out


def per_expert_sources(
    name: str, shape: tuple[int, ...]
) -> tuple[list[str], Callable[[list[torch.Tensor]], torch.Tensor]] | None:
    """The per-expert tensors our tensor `name` of `shape` is made of, and how to join them;
    None for a name the per-expert layout does not change."""
    if m := _ROUTER.match(name):
        return [f"{m['layer']}.block_sparse_moe.gate.weight"], lambda ts: ts[0]
    if not (m := _EXPERTS.match(name)):
        return None
    prefix = f"{m['layer']}.block_sparse_moe.experts"
    experts = range(shape[0])
    if m["kind"] == "down_proj":
        return [f"{prefix}.{e}.w2.weight" for e in experts], torch.stack
    names = [f"{prefix}.{e}.{w}.weight" for e in experts for w in ("w1", "w3")]

    def join(ts: list[torch.Tensor]) -> torch.Tensor:  # [gate; up] per expert
        return torch.stack([torch.cat(ts[i : i + 2], dim=0) for i in range(0, len(ts), 2)])

    return names, join
