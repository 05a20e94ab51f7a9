"""An estimate of the Llama's (and Mixtral's) activation memory per device, for the plan's
verdict.

Counted per token and layer: the tensors autograd keeps for the backward pass (the inputs of
every norm, projection and nonlinearity, RoPE's outputs, the attention output, and with
attention written out, its probabilities [heads × sequence]); with remat only each layer's
input is kept, plus one layer's worth while it is recomputed; offloaded activations are kept
on the host instead. Then the logits, in the model's dtype and as float32 for the loss: of the
whole sequence, or of one chunk of model.loss_chunk_size positions (models/chunked_loss.py).
A mixture-of-experts block keeps its expert buffers instead of the MLP's activations: per
token, top-k x capacity_factor slots of the hidden width (the dispatched tokens and the
experts' outputs) and of four times the expert width (the SwiGLU inside each expert), so
the capacity factor scales them (dropless routing on XLA: every expert, E slots a token).
Its routing also gathers the whole micro-batch's tokens and their k outputs on every device
while the layer runs (`routing_gather_elements`), counted in the working set.

With the sequence split over `context` (context parallelism, torchprime/context.py) a device
holds T / N tokens of each of its rows, so every per-token term falls N-fold; what does not is
the keys and values attention gathers whole (each layer keeps them for the backward pass), and
the written-out attention's probabilities and mask, whose key dimension stays T. The split is
counted only where the activations really are split (`sequence_split`), not from the mesh
alone. eager and sdpa build a boolean mask [rows, 1, T / N, T] per layer call (causal order
and packed documents' segments; [T / N, T] without segments); the Pallas kernels take segment
ids and make none. What XLA adds (fusion temporaries, collective buffers, padding) is not
counted, and it may also free or reuse buffers this count keeps: read the figure as a first
order of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.llama import LlamaConfig
from torchprime.attention import TPU_KERNELS
from torchprime.mesh import BATCH_AXES, Mesh
from torchprime.rewriting import RematConfig

#: Bytes of the float32 copy of the logits the loss takes.
LOSS_BYTES = 4


@dataclass(frozen=True)
class ActivationEstimate:
    kept_bytes: int
    """Kept on the device from the forward to the backward pass, all layers."""
    working_bytes: int
    """One layer's activations while it runs or is recomputed, and the logits."""
    host_bytes: int
    """Offloaded to host memory (per device)."""
    tokens: int
    """Tokens of one micro-batch on one device."""
    logits_bytes: int = 0
    """Of `working_bytes`, the logits alive at once (one chunk's with model.loss_chunk_size)."""

    @property
    def device_bytes(self) -> int:
        return self.kept_bytes + self.working_bytes


def per_token_layer_elements(cfg: LlamaConfig, tensor: int, seq_len: int) -> dict[str, float]:
    """Elements one token keeps in one layer for the backward pass, by activation, on one
    device (head and MLP dimensions split over the `tensor` axis)."""
    h, d = cfg.hidden_size, cfg.resolved_head_dim
    q, kv, mlp = (
        cfg.num_attention_heads * d / tensor,
        cfg.num_key_value_heads * d / tensor,
        (cfg.intermediate_size / tensor),
    )
    counts = {
        "decoder_input": h,  # the input norm's input
        "attention_norm": h,  # the q/k/v projections' input
        "q_proj": q,
        "k_proj": kv,
        "v_proj": kv,
        "rope": q + kv,  # rotated queries and keys
        "attention_output": q,  # o_proj's input
        "mlp_input": h,  # the post-attention norm's input
        "mlp_norm": h,
    }
    experts = getattr(cfg, "num_local_experts", None)
    if experts is None:
        counts["mlp"] = 4 * mlp  # gate, up, silu(gate), their product (down_proj's input)
    else:
        counts.update(moe_per_token_elements(cfg, tensor, seq_len))
    if cfg.attention_kernel not in TPU_KERNELS:
        counts["attention_probs"] = cfg.num_attention_heads / tensor * seq_len
    return counts


def routed_per_row(cfg: LlamaConfig) -> bool:
    """A mixture of experts routed within each row (capacity_per_row, models/moe_rows.py)."""
    routing = getattr(cfg, "moe_implementation", None)
    return str(getattr(routing, "value", routing)) == "capacity_per_row"


def expert_slots_per_token(cfg: LlamaConfig) -> float:
    """Expert-buffer slots per token of a mixture-of-experts layer: top-k x the capacity
    factor with capacity routing; every expert with dropless routing on XLA, which runs
    every expert on every token to keep shapes static (models/moe.py)."""
    routing = str(getattr(cfg.moe_implementation, "value", cfg.moe_implementation))
    if routing.startswith("capacity"):
        return cfg.num_experts_per_tok * cfg.capacity_factor
    return cfg.num_local_experts


def routing_gather_elements(cfg: LlamaConfig, device_tokens: float, mesh: Mesh) -> float:
    """What a mixture-of-experts layer gathers on every device while it runs: the routing
    fills the experts' slots over the whole micro-batch (models/moe.py), so each device
    receives its tokens [tokens, hidden] and their k expert outputs [k x tokens, hidden]."""
    if getattr(cfg, "num_local_experts", None) is None or routed_per_row(cfg):
        return 0.0
    batch_tokens = device_tokens * mesh.size(BATCH_AXES)
    return batch_tokens * (1 + cfg.num_experts_per_tok) * cfg.hidden_size


def moe_per_token_elements(cfg: LlamaConfig, tensor: int, seq_len: int) -> dict[str, float]:
    """What a mixture-of-experts block keeps per token for the backward pass: the router's
    logits and probabilities, the dispatched tokens and the experts' outputs ([experts,
    capacity, hidden] buffers: slots x hidden per token), each slot's gate, up, silu(gate)
    and product, and the k outputs picked back per token; routed per row, its dispatch and
    combine masks."""
    h, slots = cfg.hidden_size, expert_slots_per_token(cfg)
    counts = {
        "router": 2 * cfg.num_local_experts,
        "dispatched": slots * h,
        "experts": slots * 4 * cfg.intermediate_size / tensor,
        "expert_output": slots * h,
        "combined": cfg.num_experts_per_tok * h,
    }
    if routed_per_row(cfg):
        # the dispatch and combine masks [rows, T, E, C]: E x C = slots x T a token
        counts["routing_masks"] = 2 * slots * seq_len
    return counts


def estimate_activations(
    cfg: LlamaConfig,
    remat: RematConfig,
    mesh: Mesh,
    rows_per_device: float,
    seq_len: int,
    dtype_bytes: int,
    layer_class: str,
    sequence_split: int = 1,
    segment_ids: bool = False,
) -> ActivationEstimate:
    """Activation memory of one micro-batch of `rows_per_device` rows on one device;
    `layer_class` names the decoder layer (whole-layer remat is recognized by it);
    `sequence_split`: devices each row's sequence is split over (the context axis when the
    activations are split over it, else 1); `segment_ids`: packed documents' masks."""
    tensor = mesh.shape["tensor"]
    tokens = int(rows_per_device * seq_len / sequence_split)
    counts = per_token_layer_elements(cfg, tensor, seq_len)
    layer = sum(counts.values()) * tokens * dtype_bytes
    if sequence_split > 1 and cfg.attention_kernel not in TPU_KERNELS:
        # keys and values gathered whole over context, kept for the backward pass (the Pallas
        # kernels split heads over context instead: their per-token terms fall N-fold)
        kv = cfg.num_key_value_heads * cfg.resolved_head_dim / tensor
        layer += 2 * kv * rows_per_device * seq_len * dtype_bytes
    if cfg.attention_kernel not in TPU_KERNELS:
        # the boolean mask, made per layer call and dropped after it
        mask_rows = rows_per_device if segment_ids else 1
        layer_mask = mask_rows * (seq_len / sequence_split) * seq_len
    else:
        layer_mask = 0
    layers = cfg.num_hidden_layers
    rematerialized = layer_class in remat.activation_checkpoint_layers
    offloaded = set(remat.offload_tensors) if remat.scan_layers else set()
    if rematerialized or offloaded:
        # Each layer keeps what the offload keeps (on the host) or its input; one layer is
        # recomputed at a time.
        kept_names = offloaded or {"decoder_input"}
        kept = sum(counts[n] for n in kept_names) * tokens * dtype_bytes * layers
        host = kept if offloaded else 0
        device_kept = 0 if offloaded else kept
        working = layer + layer_mask
    else:
        host, device_kept, working = 0, layer * layers, layer_mask
    working += routing_gather_elements(cfg, rows_per_device * seq_len, mesh) * dtype_bytes
    vocab = cfg.vocab_size / tensor  # the LM head's output split over tensor, as in fsdp_tp
    logit_tokens = tokens
    if cfg.loss_chunk_size is not None:  # one chunk of positions of every row at a time
        logit_tokens = min(tokens, int(rows_per_device * cfg.loss_chunk_size / sequence_split))
    logits = int(logit_tokens * vocab * (dtype_bytes + LOSS_BYTES))
    return ActivationEstimate(int(device_kept), int(working + logits), int(host), tokens, logits)
