"""A sparse mixture-of-experts feed-forward block (Mixtral's), as a plain nn.Module.

Each token's router logits pick its top-k experts; their softmax weights, renormalized over
the k, mix the experts' SwiGLU outputs. Parameter names and shapes are those of transformers 5:
`gate.weight` [E, H] (the router), `experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
[E, H, I]. Shapes: N tokens (batch x sequence), H hidden, I expert width, E experts, k experts
per token, C capacity (token slots per expert).

Routing (`moe_implementation`):
- `dropless`: every token reaches its k experts, as in HF. Where shapes may depend on the data
  (eager), each expert runs on the tokens that chose it (HF's loop); where they must be static
  (`static_shapes`, set from outside on XLA), every expert runs on every token and the
  unchosen outputs get weight 0: the same result at E / k times the expert FLOPs.
- `capacity`: each expert has C = ceil(capacity_factor x N x k / E) slots, filled in token
  order with every token's first choice before any second choice (Switch / GShard priority);
  assignments beyond C are dropped (the token keeps its residual only) and counted. Static
  shapes: the tokens are gathered into a dispatched [E, C, H] tensor and the experts' outputs
  [E, C, H] gathered back.
Both dispatched tensors pass through `constrain_dispatch`, which the sharding layer sets to lay
them out over the `expert` mesh axis (identity by default).

The block also returns its router statistics (`RouterStats`), summed over the layers by the
model, from which the load-balancing loss, the router z-loss and the metrics are computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

from models.moe_rows import route_per_row


class MoeImplementation(StrEnum):
    dropless = "dropless"
    capacity = "capacity"
    capacity_per_row = "capacity_per_row"


def _identity(t: torch.Tensor, role: str | None = None) -> torch.Tensor:
    return t


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Slots per expert: ceil(factor x tokens x k / experts), at least 1."""
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


class RouterStats:
    """The layout of a layer's router statistics, one float32 vector of 2E + 2 entries:
    [0, E) top-k assignments per expert, [E, 2E) router probability per expert summed over the
    tokens, 2E the sum over tokens of logsumexp(logits)^2 (z-loss), 2E + 1 assignments dropped
    over capacity. Sums, so that the layers add up (the stack carries them from layer to
    layer, a scan included)."""

    @staticmethod
    def size(num_experts: int) -> int:
        return 2 * num_experts + 2

    @staticmethod
    def losses_and_metrics(
        stats: torch.Tensor, num_experts: int, top_k: int, num_tokens: int, num_layers: int
    ) -> dict[str, torch.Tensor]:
        """aux_loss (Switch / Mixtral load balancing, as transformers computes it), z_loss,
        dropped_fraction (of the token-to-expert assignments), max/min_expert_load (an
        expert's assignments over the even share: 1 is perfect balance), all over the layers."""
        E = num_experts
        rows = num_tokens * num_layers
        counts, prob_sums = stats[:E], stats[E : 2 * E]
        # transformers' load_balancing_loss_func: E * sum_e f_e * P_e, with f_e the top-k
        # assignments of expert e and P_e its mean router probability, both over all layers'
        # tokens (the assignment counts carry no gradient, the probabilities do).
        aux = E * torch.sum((counts.detach() / rows) * (prob_sums / rows))
        load = counts.detach() * E / (rows * top_k)
        return {
            "aux_loss": aux,
            "z_loss": stats[2 * E] / rows,
            "dropped_fraction": stats[2 * E + 1].detach() / (rows * top_k),
            "max_expert_load": load.max(),
            "min_expert_load": load.min(),
        }


class MixtralExperts(nn.Module):
    """E SwiGLU experts stored as 3-d tensors (transformers 5's fused layout)."""

    active_fraction: float = 1.0
    """The share of the experts' weights one token uses (k / E, set by its block): model
    FLOPs and MFU count only those (trainers/metrics.py)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        E, H, width = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * width, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, width))

    def forward(self, dispatched: torch.Tensor) -> torch.Tensor:
        """[E, C, H] tokens, each expert on its own C → [E, C, H]."""
        gate, up = torch.einsum("ech,eih->eci", dispatched, self.gate_up_proj).chunk(2, dim=-1)
        return torch.einsum("eci,ehi->ech", F.silu(gate) * up, self.down_proj)

    def one(self, expert: int, tokens: torch.Tensor) -> torch.Tensor:
        """Expert `expert` on [n, H] tokens → [n, H]."""
        gate, up = F.linear(tokens, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[expert])


class MixtralSparseMoeBlock(nn.Module):
    constrain_dispatch: Callable[..., torch.Tensor] = staticmethod(_identity)
    """Applied to the dispatched tokens [E, C, H] and to the experts' outputs [E, C, H]; set
    from outside (the sharding layer) to lay them out over the `expert` axis. Routing per row
    also says which way each goes (role "dispatch" or "combine", models/moe_rows.py)."""
    static_shapes: bool = False
    """Route with shapes that do not depend on the data (set from outside on XLA): dropless
    then runs every expert on every token."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        implementation: MoeImplementation,
        capacity_factor: float,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.implementation = MoeImplementation(implementation)
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.experts = MixtralExperts(num_experts, hidden_size, intermediate_size)
        self.experts.active_fraction = top_k / num_experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] → (output [B, T, H], this layer's RouterStats vector)."""
        B, T, H = x.shape
        tokens = x.reshape(-1, H)  # [N, H]
        logits = self.gate(tokens)  # [N, E]
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalized, as Mixtral does
        dropped = torch.zeros((), dtype=torch.float32, device=x.device)
        if self.implementation == MoeImplementation.capacity:
            out, dropped = self._capacity(tokens, weights, chosen)
        elif self.implementation == MoeImplementation.capacity_per_row:
            C = expert_capacity(T, self.top_k, self.num_experts, self.capacity_factor)
            out, dropped = route_per_row(
                x, weights, chosen, self.experts, self.num_experts, C, self.constrain_dispatch
            )
        elif self.static_shapes:
            out = self._dense(tokens, weights, chosen)
        else:
            out = self._per_expert(tokens, weights, chosen)
        counts = F.one_hot(chosen, self.num_experts).sum(dim=(0, 1)).float()
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).sum()
        stats = torch.cat([counts, probs.sum(dim=0), z[None], dropped[None]])
        return out.reshape(B, T, H), stats

    def _experts(self, dispatched: torch.Tensor) -> torch.Tensor:
        return self.constrain_dispatch(self.experts(self.constrain_dispatch(dispatched)))

    def _per_expert(
        self, tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor
    ) -> torch.Tensor:
        """Each expert on the tokens that chose it (data-dependent shapes: eager only)."""
        out = torch.zeros_like(tokens)
        for e in range(self.num_experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            y = self.experts.one(e, tokens[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def _dense(
        self, tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor
    ) -> torch.Tensor:
        """Every expert on every token, the unchosen ones weighted 0 (static shapes)."""
        N, H = tokens.shape
        combine = torch.zeros(N, self.num_experts, dtype=weights.dtype, device=tokens.device)
        combine = combine.scatter(1, chosen, weights)  # [N, E]
        y = self._experts(tokens.expand(self.num_experts, N, H))  # [E, N, H]
        return torch.einsum("enh,ne->nh", y.float(), combine).to(tokens.dtype)

    def _capacity(
        self, tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to C tokens an expert, first choices first (static shapes); returns the output
        and the count of dropped assignments."""
        N, H = tokens.shape
        E, k = self.num_experts, self.top_k
        C = expert_capacity(N, k, E, self.capacity_factor)
        expert = chosen.t().reshape(-1)  # [k N]: all first choices, then all second choices
        onehot = F.one_hot(expert, E).to(torch.int32)  # [k N, E]
        position = (torch.cumsum(onehot, dim=0) * onehot).sum(dim=-1) - 1  # place in its expert
        kept = position < C
        # Slot of each assignment in the flattened [E * C] buffer; the dropped ones go to an
        # extra slot E * C that no expert reads and that holds zeros on the way back.
        slot = torch.where(kept, expert * C + position, torch.full_like(expert, E * C))
        token_ids = torch.arange(N, device=tokens.device).repeat(k)
        token_of_slot = torch.full((E * C + 1,), N, dtype=token_ids.dtype, device=tokens.device)
        token_of_slot = token_of_slot.scatter(0, slot, token_ids)[: E * C]
        padded = torch.cat([tokens, tokens.new_zeros(1, H)])  # row N: an empty slot
        y = self._experts(padded[token_of_slot].view(E, C, H))  # [E, C, H]
        y = torch.cat([y.reshape(E * C, H), y.new_zeros(1, H)])
        picked = y[slot].view(k, N, H).float()  # each assignment's output, 0 when dropped
        out = (picked * weights.t()[..., None]).sum(dim=0).to(tokens.dtype)
        return out, (~kept).sum().float()
