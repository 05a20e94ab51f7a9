"""Llama (Llama 2 / 3 / 3.1 / 3.2 architecture) as a plain nn.Module.

No sharding or XLA code lives here: parallelism is applied from outside by parameter and module
names (torchprime.sharding). Field names follow HF `LlamaConfig`, so configs and checkpoints
map one to one. Shapes: B batch, T sequence, H heads, K key/value heads, D head dim, E hidden.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.chunked_loss import IGNORE_INDEX, Barrier, chunked_cross_entropy
from models.masks import allowed_keys
from torchprime.attention import AttentionKernel, KernelPlacement, tpu_attention
from torchprime.errors import Problems
from torchprime.offload import offload_name
from torchprime.rewriting import RematConfig
from torchprime.sharding import ShardingConfig

if TYPE_CHECKING:
    from torchprime.context import SequenceLayout


@dataclass
class RopeScalingConfig:
    """Llama 3.1 frequency scaling of RoPE for long contexts (HF `rope_scaling`, type llama3)."""

    rope_type: str = "llama3"
    """Only "llama3" is implemented."""
    factor: float = 8.0
    """How much longer the context is than the one the model was first trained on."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """The context length before scaling."""


@dataclass
class LlamaConfig:
    """The model: architecture (HF LlamaConfig names), kernels, and how it is sharded."""

    family: ClassVar[str] = "llama"
    """The `name` this schema belongs to (a Mixtral preset brings its own schema)."""

    name: str = "llama"
    """Model family in the registry (models.MODELS): llama or mixtral. Set by the model preset
    (configs/model/), which also picks the family's schema."""
    vocab_size: int = 264
    """Rows of the embedding and the LM head; at least the tokenizer's vocabulary."""
    hidden_size: int = 128
    intermediate_size: int = 384
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    """Grouped-query attention: each key/value head serves heads / kv_heads query heads."""
    head_dim: int | None = None
    """Per-head width; null means hidden_size / num_attention_heads."""
    max_position_embeddings: int = 2048
    """The longest sequence the model is built for (checked against data.block_size)."""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig | None = None
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the LM head."""
    initializer_range: float = 0.02
    """Standard deviation of the normal init of linear and embedding weights."""
    scale_output_init: bool = False
    """Divide the init std of o_proj and down_proj by sqrt(2 * num_hidden_layers) (GPT-2 style)."""
    attention_kernel: AttentionKernel = AttentionKernel.sdpa
    """eager (reference math), sdpa (torch.nn.functional.scaled_dot_product_attention), or on
    TPU the Pallas kernels flash and splash (torchprime/attention.py)."""
    attention_block_sizes: dict[str, int] = field(default_factory=dict)
    """flash / splash block sizes overriding torch_xla's defaults (names and defaults in
    torchprime/attention.py: block_q, block_k_major, ... for flash; sa_block_q, ... for splash).
    The sequence is padded up to a multiple of the q/kv blocks."""
    is_causal: bool = True
    """Causal language model; false gives bidirectional attention."""
    load_balance_context: bool = False
    """With context parallelism (ici_mesh.context x dcn_mesh.context = N > 1), reorder each
    row into 2N chunks, chunk i next to chunk 2N-1-i, so every device of the context axis gets
    the same share of causal attention work; positions, segment ids and the causal order
    follow the permutation and the loss is unchanged. eager and sdpa only (the Pallas kernels
    split heads over context instead, which is balanced already)."""
    shift_before_head: bool = True
    """With labels, leave out the last position (it predicts nothing) before the LM head, so
    the [batch, sequence, vocab] logits are never made for it: the same loss, and logits of
    sequence - 1 positions. false: logits for every position, as HF returns them."""
    loss_chunk_size: int | None = None
    """With labels, compute the LM head and the loss this many positions at a time (every row
    in each chunk; the last chunk holds the remainder when it does not divide the positions),
    recomputing each chunk's logits in backward: at most one chunk's [rows, chunk, vocab]
    logits exist instead of the whole sequence's (models/chunked_loss.py). The same loss and
    gradients; the output has no logits. null: the whole sequence at once."""
    pretrained_path: str | None = None
    """An HF folder of this family (config.json + safetensors) to start from instead of a
    random init; its architecture must match this config."""
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    """Partition specs of the parameters (configs/model/sharding/)."""
    remat: RematConfig = field(default_factory=RematConfig)
    """Scan, rematerialization and optimization barriers (configs/model/remat/)."""

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def problems(self, key: str = "model") -> Problems:
        """What makes this architecture impossible, one line a problem naming the key."""
        found = Problems()
        if self.name != self.family:
            found.append(
                f"{key}.name={self.name!r} does not match the model preset's schema "
                f"({type(self).__name__}, name {self.family!r}): choose the family with a "
                f"preset, model=PRESET (configs/model/), which sets both."
            )
            return found
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            found.check(value >= 1, f"{key}.{name}={value}: must be at least 1.")
        if found:
            return found  # the checks below divide by these
        found.check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"{key}.num_attention_heads={self.num_attention_heads} is not a multiple of "
            f"{key}.num_key_value_heads={self.num_key_value_heads}.",
        )
        if self.head_dim is None:
            found.check(
                self.hidden_size % self.num_attention_heads == 0,
                f"{key}.hidden_size={self.hidden_size} does not divide into "
                f"{self.num_attention_heads} heads; set {key}.head_dim.",
            )
        found.check(
            self.resolved_head_dim % 2 == 0,
            f"{key}: head_dim={self.resolved_head_dim} must be even for RoPE.",
        )
        found.check(
            self.loss_chunk_size is None or self.loss_chunk_size >= 1,
            f"{key}.loss_chunk_size={self.loss_chunk_size}: must be at least 1 (or null: off).",
        )
        if self.rope_scaling is not None:
            found.check(
                self.rope_scaling.rope_type == "llama3",
                f"{key}.rope_scaling.rope_type={self.rope_scaling.rope_type!r}: only llama3.",
            )
        return found

    def validate(self, key: str = "model") -> None:
        """Raise a ConfigError naming every problem of `problems`."""
        self.problems(key).raise_if_any()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 whatever the model dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3.1 scaling when configured."""
    dim = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        # float32 whatever the model dtype: bfloat16 frequencies would blur far positions.
        inv_freq = torch.empty(cfg.resolved_head_dim // 2, dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_weights(self) -> None:
        with torch.no_grad():
            self.inv_freq.copy_(rope_inv_freq(self.cfg))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # [B, T] positions → cos, sin of shape [B, 1, T, D], computed in float32.
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # In x's dtype: under autocast (precision.compute) x is a bfloat16 projection and the
    # tables float32; queries, keys and values must agree for attention.
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class LlamaAttention(nn.Module):
    kernel_placement: KernelPlacement | None = None
    """The mesh a Pallas kernel runs on, given from outside (torchprime.attention.place_kernels)."""
    sequence_layout: SequenceLayout | None = None
    """Context parallelism, given from outside (torchprime.context): lays queries out split
    over the sequence and gathers keys and values whole, so each query sees its causal past."""
    offloaded: frozenset[str] = frozenset()
    """Marked activations kept on the host, set from outside (torchprime.offload.activate)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = offload_name(self.q_proj(x), "q_proj", self.offloaded)
        k = offload_name(self.k_proj(x), "k_proj", self.offloaded)
        v = offload_name(self.v_proj(x), "v_proj", self.offloaded)
        # Heads counted from the projections, not the config: under tensor parallelism each
        # device holds only its heads (torchprime/backend/distributed.py).
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H|K, T, D]
        if self.sequence_layout is not None:
            q = self.sequence_layout.queries(q)
            k, v = self.sequence_layout.keys_values(k), self.sequence_layout.keys_values(v)
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # [B, H, T, D]
        kernel, causal = self.cfg.attention_kernel, self.cfg.is_causal
        if kernel == "sdpa":
            out = sdpa_attention(q, k, v, causal, bias, segment_ids, token_index)
        elif kernel == "eager":
            out = eager_attention(q, k, v, causal, bias, segment_ids, token_index)
        else:
            out = tpu_attention(
                kernel,
                q,
                k,
                v,
                causal,
                bias,
                segment_ids,
                self.cfg.attention_block_sizes,
                self.kernel_placement,
            )
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(offload_name(out, "attention_output", self.offloaded))


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, K, T, D] → [B, H, T, D], each key/value head repeated for its H / K query heads in
    a row (repeat_interleave's order). Without grouping nothing is copied, and with it the copy
    is one broadcast, not the gather repeat_interleave makes (and its backward a sum, not a
    scatter)."""
    B, K, T, D = x.shape
    if K == num_heads:
        return x
    return x[:, :, None].expand(B, K, num_heads // K, T, D).reshape(B, num_heads, T, D)


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    bias: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    token_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ / √D + mask + bias) v, written out: the reference the kernels match. The
    mask (causal order, segments) is built here, per call, as booleans (models.masks)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, T, T]
    lowest = torch.finfo(scores.dtype).min
    allowed = allowed_keys(is_causal, q.shape[-2], k.shape[-2], q.device, segment_ids, token_index)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, lowest)
    if bias is not None:
        # Two blocking terms must not add up to -inf: a row with every key blocked would
        # give NaN instead of a harmless uniform average.
        scores = (scores + bias.to(scores.dtype)).clamp(min=lowest)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    bias: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    token_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch's fused attention. It takes a causal flag or a mask, not both: with segment
    ids, a reordered sequence or a bias, the mask is made here (boolean, or float only when a
    bias is given)."""
    if bias is None and segment_ids is None and token_index is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    allowed = allowed_keys(is_causal, q.shape[-2], k.shape[-2], q.device, segment_ids, token_index)
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    mask = bias.to(q.dtype)
    if allowed is not None:
        lowest = torch.finfo(q.dtype).min
        mask = mask.masked_fill(~allowed, lowest).clamp(min=lowest)  # see eager_attention
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    offloaded: frozenset[str] = frozenset()
    """Marked activations kept on the host, set from outside (torchprime.offload.activate)."""
    make_mlp: ClassVar[Callable[[LlamaConfig], nn.Module]] = LlamaMLP
    """Builds the feed-forward block (a mixture of experts in models/mixtral.py)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = self.make_mlp(cfg)

    def attend(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention half: x + attention(norm(x)), marked as the feed-forward's input."""
        x = offload_name(x, "decoder_input", self.offloaded)
        attention = self.self_attn(
            self.input_layernorm(x), cos, sin, segment_ids, token_index, bias
        )
        return offload_name(x + attention, "mlp_input", self.offloaded)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward half's output on x (the residual not added)."""
        return self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, *shared: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, E]; shared: cos, sin, segment_ids, token_index, bias (see `attend`)."""
        x = self.attend(x, *shared)
        return x + self.feed_forward(x)


class LayerStack(nn.ModuleList):
    """Identical layers applied in turn, each taking (x, *shared) and returning the new x.

    x is a tensor, or a tuple of tensors every layer updates (a mixture of experts carries its
    router statistics beside the hidden states); `shared` is the same for every layer. The
    stack is one call in the model's forward, so the model rewriting can run it as a scan
    (torchprime.rewriting): one layer compiled once, however deep the stack.
    """

    def forward(self, x: Any, *shared: torch.Tensor | None) -> Any:
        for layer in self:
            x = layer(x, *shared)
        return x


class LlamaModel(nn.Module):
    """The decoder stack without the LM head (HF's `model.` prefix)."""

    layer_class: ClassVar[type[nn.Module]] = LlamaDecoderLayer

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = LayerStack(self.layer_class(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [B, T, E]
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        x = self.layers(self.carry_in(x), cos, sin, segment_ids, token_index, attention_bias)
        return self.carry_out(x)

    def carry_in(self, x: torch.Tensor) -> Any:
        """What the layer stack carries from layer to layer, starting from the embeddings."""
        return x

    def carry_out(self, carried: Any) -> Any:
        """The model's output from the stack's last carry: the final norm of the hidden states."""
        return self.norm(carried)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    """[B, T, vocab]; None when the loss was computed in chunks (model.loss_chunk_size)."""
    loss: torch.Tensor | None
    """Mean cross-entropy over the tokens with a label (plus a model's own auxiliary losses,
    such as a mixture of experts' router losses); None without labels."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Scalars to log beside the loss (a mixture of experts: aux_loss, dropped_fraction...)."""


class LlamaForCausalLM(nn.Module):
    offload_names = ("decoder_input", "q_proj", "k_proj", "v_proj", "attention_output", "mlp_input")
    """Activations marked for `model.remat.offload_tensors` (torchprime.offload), per layer."""
    loss_barrier: Barrier | None = None
    """The backend's optimization barrier for the chunked loss, set from outside
    (torchprime.rewriting): on XLA it keeps the chunks apart (models/chunked_loss.py)."""

    model_class: ClassVar[type[nn.Module]] = LlamaModel
    config_class: ClassVar[type[LlamaConfig]] = LlamaConfig

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = self.model_class(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    @property
    def decoder_layers(self) -> LayerStack:
        """The stack of identical decoder layers (what scan and per-layer remat act on)."""
        return self.model.layers

    def tie_weights(self) -> None:
        """Share the embedding with the LM head again (`to_empty` unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_module_weights(self, name: str, module: nn.Module, generator: torch.Generator) -> None:
        """Initialize what `module` holds directly, drawing from `generator` on the host.

        Linear and embedding weights ~ N(0, initializer_range) (output projections optionally
        scaled by depth), norms = 1, RoPE frequencies recomputed (they are not saved).
        """
        cfg = self.config
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if module is self.lm_head and cfg.tie_word_embeddings:
                return  # the embedding's init
            std = cfg.initializer_range
            if cfg.scale_output_init and name.endswith(("o_proj", "down_proj")):
                std /= math.sqrt(2 * cfg.num_hidden_layers)
            _normal_(module.weight, std, generator)
        elif isinstance(module, (RMSNorm, RotaryEmbedding)):
            module.init_weights()

    def init_weights(self, generator: torch.Generator) -> None:
        """Seeded init of the whole model in place (see `init_module_weights`)."""
        for name, module in self.named_modules():
            self.init_module_weights(name, module, generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids, labels, position_ids, segment_ids, targets: [B, T].

        labels: aligned with `input_ids` (the token at t is predicted from position t - 1);
        -100 marks positions without a label.
        segment_ids: packed documents; a token attends only to tokens of its own segment. The
        mask is built inside attention at each layer call (or handed to the Pallas kernels as
        segment ids), never stored.
        attention_bias: an additive bias for callers who have one, broadcastable to
        [B, heads, T, T] (0 to attend, a large negative number to block; models/masks.py),
        on top of the causal and segment masks.
        token_index [T] or [B, T], targets: for a reordered sequence (context load
        balancing, torchprime.context): each token's place in the original row, which the
        causal order follows, and the next-token target of each position (labels already
        shifted, -100 where none), given instead of `labels`."""
        if position_ids is None:
            T = input_ids.shape[1]
            position_ids = torch.arange(T, device=input_ids.device).expand_as(input_ids)
        decoded = self.model(input_ids, position_ids, segment_ids, token_index, attention_bias)
        return self.output(decoded, labels, targets)

    def output(
        self, hidden: torch.Tensor, labels: torch.Tensor | None, targets: torch.Tensor | None
    ) -> CausalLMOutput:
        """The LM head and the loss on the decoder's output `hidden` [B, T, E]."""
        chunk = self.config.loss_chunk_size
        if targets is not None:
            if chunk is not None:
                loss = chunked_cross_entropy(
                    hidden, self.lm_head.weight, targets, chunk, self.loss_barrier
                )
                return CausalLMOutput(logits=None, loss=loss)
            logits = self.lm_head(hidden)
            return CausalLMOutput(logits=logits, loss=cross_entropy(logits, targets))
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(hidden), loss=None)
        if chunk is not None:
            # The last position predicts nothing: left out whatever shift_before_head says, as
            # no logits are returned to keep it for.
            loss = chunked_cross_entropy(
                hidden[:, :-1], self.lm_head.weight, labels[:, 1:], chunk, self.loss_barrier
            )
            return CausalLMOutput(logits=None, loss=loss)
        if self.config.shift_before_head:
            logits = self.lm_head(hidden[:, :-1])  # [B, T-1, vocab]: position t predicts t+1
            loss = cross_entropy(logits, labels[:, 1:])
        else:
            logits = self.lm_head(hidden)
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss from logits of every position; labels aligned with the inputs."""
    return cross_entropy(logits[:, :-1], labels[:, 1:])


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -100, computed in float32.

    Summed then divided by the count of real targets in the whole (global) batch, so the value
    does not depend on how the batch is split over devices.
    """
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def _normal_(weight: torch.Tensor, std: float, generator: torch.Generator) -> None:
    values = torch.empty(weight.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    weight.copy_(values.to(weight.dtype))
