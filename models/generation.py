"""Sampling from a Llama with a KV cache, on an eager device (CPU, CUDA): the model's own
modules, run one new token at a time against the keys and values of the tokens before.

This is decoding, not training: no sharding, no XLA (a loop whose length grows every token
would compile a graph per length). The math is the model's eager attention, restricted to the
new queries; `tests/unit/test_generation.py` checks it against the full forward and greedy
decoding against transformers' `generate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.llama import LlamaForCausalLM, apply_rope, repeat_kv


@dataclass
class KVCache:
    """Keys and values of every layer, [batch, kv heads, tokens so far, head dim]."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]

    @classmethod
    def empty(cls, layers: int) -> KVCache:
        return cls([None] * layers, [None] * layers)

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def extend(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[i] is not None:
            k, v = torch.cat([self.keys[i], k], dim=2), torch.cat([self.values[i], v], dim=2)
        self.keys[i], self.values[i] = k, v
        return k, v


@torch.no_grad()
def forward_cached(
    model: LlamaForCausalLM, input_ids: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """Logits [B, T, vocab] of `input_ids` [B, T], the tokens that follow the cache's; the
    cache is extended by them."""
    start, (B, T) = cache.length, input_ids.shape
    core = model.model
    x = core.embed_tokens(input_ids)
    positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
    cos, sin = core.rotary_emb(positions, x.dtype)
    # New query t (at position start + t) sees every key up to its own position.
    keys_at = torch.arange(start + T, device=input_ids.device)
    future = keys_at[None, :] > positions[0, :, None]  # [T, start + T]
    for i, layer in enumerate(core.layers):
        attn, h = layer.self_attn, layer.input_layernorm(x)
        D = attn.head_dim
        q = attn.q_proj(h).view(B, T, -1, D).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, -1, D).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, -1, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.extend(i, k, v)
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + attn.o_proj(out)
        x = x + layer.feed_forward(x)
    return model.lm_head(core.norm(x))


def next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """One token from the last position's logits [vocab]: the most likely at temperature 0,
    else a draw from the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token while the mass before it is below top_p (the first is always kept)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """The tokens that follow `prompt_ids` (at most max_new_tokens; stops after `eos_id`)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache.empty(len(model.model.layers))
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = forward_cached(model, ids, cache)[0, -1]
        token = next_token(logits, temperature, top_p, generator)
        new.append(token)
        if token == eos_id:
            break
        ids = torch.tensor([[token]], dtype=torch.long, device=device)
    return new
