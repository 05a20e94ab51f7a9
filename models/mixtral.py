"""Mixtral (sparse mixture of experts) as a plain nn.Module: the Llama of models/llama.py with
each feed-forward block replaced by a mixture of experts (models/moe.py).

Attention, RMSNorm, RoPE, the embedding, the chunked loss and the forward signature are
Llama's. Names and fields are HF's (transformers 5 layout): `model.layers.N.mlp.gate.weight`
[E, H], `model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H], `...experts.down_proj` [E, H, I].
The layer stack carries each layer's router statistics beside the hidden states, so a scanned
stack returns them too; the load-balancing loss (and the optional router z-loss) are added to
the training loss, and the routing metrics are returned for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from models.llama import (
    CausalLMOutput,
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    _normal_,
)
from models.moe import MixtralExperts, MixtralSparseMoeBlock, MoeImplementation, RouterStats
from torchprime.errors import Problems


@dataclass
class MixtralConfig(LlamaConfig):
    """Llama's fields (HF names) plus the experts (HF MixtralConfig names) and their routing.

    The defaults of the fields Llama has are Llama's (a tiny model); configs/model/ presets set
    the published sizes."""

    family: ClassVar[str] = "mixtral"

    name: str = "mixtral"
    """Model family in the registry (models.MODELS)."""
    num_local_experts: int = 4
    """Experts E in every layer's feed-forward block."""
    num_experts_per_tok: int = 2
    """Experts k each token is routed to (top-k of the router's softmax, renormalized)."""
    moe_implementation: MoeImplementation = MoeImplementation.dropless
    """dropless: every token reaches its k experts (HF's result; on XLA, with static shapes,
    every expert runs on every token: E / k times the expert FLOPs). capacity: each expert
    takes at most capacity_factor x tokens x k / E tokens of the batch, first choices first,
    the rest dropped and counted (static shapes, the TPU form). models/moe.py.
    capacity_per_row: the same within each row of the batch (capacity_factor x row length x
    k / E slots per row and expert), dispatched by einsums: the form expert parallelism moves
    with all-to-alls instead of gathering the batch (models/moe_rows.py)."""
    capacity_factor: float = 1.25
    """With capacity routing: slots per expert as a multiple of an even share of the tokens."""
    router_aux_loss_coef: float = 0.02
    """Weight of the load-balancing loss (Switch / Mixtral form, as transformers computes it)
    added to the training loss; 0 turns it off (it is still logged as aux_loss)."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss (ST-MoE: the mean squared logsumexp of the router logits)
    added to the training loss; 0: off (logged as z_loss either way)."""
    sliding_window: int | None = None
    """Attention window of HF Mixtral; only null (full causal attention) is implemented."""

    def problems(self, key: str = "model") -> Problems:
        found = super().problems(key)
        if found:
            return found
        found.check(
            self.num_local_experts >= 1,
            f"{key}.num_local_experts={self.num_local_experts}: must be at least 1.",
        )
        found.check(
            1 <= self.num_experts_per_tok <= self.num_local_experts,
            f"{key}.num_experts_per_tok={self.num_experts_per_tok}: must be between 1 and "
            f"{key}.num_local_experts={self.num_local_experts}.",
        )
        found.check(
            self.capacity_factor > 0,
            f"{key}.capacity_factor={self.capacity_factor}: must be positive.",
        )
        for coef in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, coef)
            found.check(value >= 0, f"{key}.{coef}={value}: must be at least 0.")
        found.check(
            self.sliding_window is None,
            f"{key}.sliding_window={self.sliding_window}: sliding-window attention is not "
            "implemented; null attends to the whole causal past.",
        )
        return found


def moe_block(cfg: MixtralConfig) -> MixtralSparseMoeBlock:
    return MixtralSparseMoeBlock(
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_local_experts,
        cfg.num_experts_per_tok,
        cfg.moe_implementation,
        cfg.capacity_factor,
    )


class MixtralDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer with a mixture of experts; carries (hidden, router statistics)."""

    make_mlp = staticmethod(moe_block)

    def forward(
        self, carry: tuple[torch.Tensor, torch.Tensor], *shared: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, stats = carry
        x = self.attend(x, *shared)
        out, layer_stats = self.routed(x)
        return x + out, stats + layer_stats

    def routed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' output on x and this layer's router statistics."""
        return self.mlp(self.post_attention_layernorm(x))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.routed(x)[0]


class MixtralModel(LlamaModel):
    """The decoder stack; returns the normed hidden states and the summed router statistics."""

    layer_class = MixtralDecoderLayer

    def __init__(self, cfg: MixtralConfig):
        super().__init__(cfg)
        # From the config, not a layer: the rewriting may replace the stack (stored stacked).
        self.num_experts = cfg.num_local_experts

    def carry_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = RouterStats.size(self.num_experts)
        return x, torch.zeros(size, dtype=torch.float32, device=x.device)

    def carry_out(self, carried: tuple[torch.Tensor, torch.Tensor]) -> Any:
        x, stats = carried
        return self.norm(x), stats


class MixtralForCausalLM(LlamaForCausalLM):
    model_class = MixtralModel
    config_class = MixtralConfig
    config: MixtralConfig

    def output(
        self,
        decoded: tuple[torch.Tensor, torch.Tensor],
        labels: torch.Tensor | None,
        targets: torch.Tensor | None,
    ) -> CausalLMOutput:
        """Llama's head and loss, plus the router losses in training (the objective; an
        evaluation's loss stays the cross-entropy, comparable with a dense model's), and the
        routing metrics."""
        hidden, stats = decoded
        out = super().output(hidden, labels, targets)
        cfg = self.config
        metrics = RouterStats.losses_and_metrics(
            stats,
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
            num_tokens=hidden.shape[0] * hidden.shape[1],
            num_layers=cfg.num_hidden_layers,
        )
        if out.loss is not None and self.training:
            out.loss = (
                out.loss
                + cfg.router_aux_loss_coef * metrics["aux_loss"]
                + cfg.router_z_loss_coef * metrics["z_loss"]
            )
        out.metrics = {k: v.detach() for k, v in metrics.items()}
        return out

    @torch.no_grad()
    def init_module_weights(self, name: str, module: nn.Module, generator: torch.Generator) -> None:
        """Llama's init, and the experts' weights ~ N(0, initializer_range) (down_proj scaled
        by depth with scale_output_init, as Llama's)."""
        if not isinstance(module, MixtralExperts):
            return super().init_module_weights(name, module, generator)
        cfg = self.config
        down_std = cfg.initializer_range
        if cfg.scale_output_init:
            down_std /= math.sqrt(2 * cfg.num_hidden_layers)
        _normal_(module.gate_up_proj, cfg.initializer_range, generator)
        _normal_(module.down_proj, down_std, generator)
