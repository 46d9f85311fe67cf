"""Activation memory of a training micro-batch, and the log-prob head's peak.

Per layer and token, what autograd keeps for the backward pass (elements of the model dtype;
float32 extras are counted at 4 bytes). The accounting follows Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198, section 4:
34*s*b*h + 5*a*s^2*b bytes per layer for GPT with fp16, sequence parallelism dividing every
term by t), adapted to this decoder:

* no dropout (no masks) and flash-style attention (no [S, S] scores; only the log-sum-exp,
  ``a`` float32 per token);
* grouped-query attention: the fused QKV output ``(nq + 2 ng) d`` stays alive because V is a view
  of it, plus the rotated Q and K ``(nq + ng) d`` and the attention output ``nq d``; RoPE's
  cos/sin tables ``4 d`` per call (unfused RoPE, ``apply_rope_fusion=False``; not split by TP);
* RMSNorm instead of LayerNorm; SwiGLU: fc1's output ``2 f`` plus the product ``f`` (fused, as
  Megatron's ``bias_swiglu`` on GPUs) or plus ``3 f`` (unfused: silu output, the linear half and
  the product, Megatron-Core's ``glu`` on CPU);
* Qwen3's per-head q/k norms: the query they normalise is a copy out of the QKV output
  (``nq d``), the unfused norm also keeps the normalised q and k.

Which kernels run changes a few terms; :class:`Kernels` names them. :data:`TE` is Transformer
Engine on GPUs (fused RMSNorm+linear keeps input and output, 2h; flash attention keeps one
output); :data:`LOCAL` is Megatron-Core's local spec with the SDPA core attention
(:mod:`k15_megatron.models.attention`): torch's RMSNorm keeps input, normalised input and output
(3h), the attention output is kept twice (SDPA's and the contiguous copy the projection saves),
under CP each layer keeps the all-gathered K/V of the whole sequence (and not the QKV output).
A query block that does not start at position 0 is attended through a [rows, keys] mask that
the CPU kernel copies to float32; the block is recomputed in backward, so no mask is kept. The
recomputed block's mask (at most 2^24 elements) is formed in the attention's backward, after the
layer's MLP activations are freed, and did not raise the measured peak: it is not counted.

Recompute (``parallel.recompute``): full keeps each layer's input only, and the backward
recomputes one layer at a time (its whole activation set alive once); selective recomputes the
core attention (its log-sum-exp and the second output copy are not kept).

The backward pass adds a transient on top of the stored activations; measured on CPU it is
about one [tokens, f/TP] block (:func:`backward_transient_bytes`). The measured error of the
whole estimate is stated in ``docs/plan.md``.

Mixture-of-experts layers (:func:`moe_mlp_bytes_per_token`; measured on CPU with the local
layers at EP=1 and EP=2, docs/plan.md): the
attention and norms as above, and in place of the dense MLP what Megatron-Core's MoE layer
(alltoall dispatcher, ``moe_router_dtype=fp32``, no token dropping, probabilities applied after
the expert activation) keeps per token:

* the router (on the sequence-parallel shard): float32 [E] scores of the load-balancing loss
  and of the routing probabilities the dispatcher keeps, two bool [E] routing maps, the top-k
  probabilities and int64 indices; a pre-softmax router (qwen2_moe) one more float32 [E];
* every token is dispatched top-k times. Assuming balanced routing, each rank receives k
  copies per token of its CP shard (the all-to-all over EP returns k per token, the all-gather
  over the expert tensor-parallel group, TP, restores the sequence-parallel split): per copy
  the experts' fc1 input ``h``, fc1's output ``2 f_e / TP``, the probability-weighted SwiGLU
  output ``f_e / TP`` (unfused: silu, linear half, product and weighted product, ``4 f_e / TP``)
  and the float32 probability. The dispatch / combine buffers (permuted tokens, all-to-all
  send and receive, the TP gather) are freed within the forward pass and are not kept;
  skewed routing puts more than k copies per token on the ranks of popular experts;
* qwen2_moe's shared expert as a dense SwiGLU MLP of ``f_s`` and the output its sigmoid gate
  multiplies (``h`` on the sequence-parallel shard).

The allgather dispatcher keeps the same expert activations (each rank computes its experts on
the tokens of the whole TP x EP group and keeps its own); its gathered hidden states are
transient too. In backward an MoE layer's transient is about one [k tokens, f_e / TP] block
(:func:`backward_transient_bytes`), as a dense layer's is one [tokens, f / TP] block.
"""

from __future__ import annotations

from dataclasses import dataclass

from k15_megatron.config.model_arch import ModelArch
from k15_megatron.plan.layout import Layout

FP32 = 4


@dataclass(frozen=True)
class Kernels:
    """The layer implementation whose saved tensors are counted."""

    name: str
    fused_norm: bool
    """RMSNorm fused with the next linear (keeps input + output) vs torch's composite RMSNorm
    (keeps input, normalised input, output)."""
    fused_swiglu: bool
    """SwiGLU as one kernel (keeps fc1's output) vs silu, add and multiply (three more f)."""
    attention_output_copies: int
    """Attention outputs kept per layer: 1 (TE), 2 (SDPA output + the projection's copy)."""
    cp_gathers_kv: bool
    """Under CP each layer keeps the all-gathered K/V of the full sequence (all-gather scheme)
    rather than only its own chunks (TE's p2p ring)."""


TE = Kernels("Transformer Engine layers (fused RMSNorm+linear, flash attention, fused SwiGLU)",
             fused_norm=True, fused_swiglu=True, attention_output_copies=1, cp_gathers_kv=False)
LOCAL = Kernels("Megatron-Core local layers with the SDPA core attention",
                fused_norm=False, fused_swiglu=False, attention_output_copies=2, cp_gathers_kv=True)


def layer_bytes_per_token(arch: ModelArch, layout: Layout, kernels: Kernels, *, sparse: bool = False) -> float:
    """Bytes one layer keeps for backward per token of this rank (no recompute), under TP,
    sequence parallelism (norm terms divided by TP) and CP (the K/V gather of :data:`LOCAL`);
    ``sparse``: a mixture-of-experts layer (:func:`moe_mlp_bytes_per_token` in place of the
    dense MLP). Units: bytes per local token (a token of this CP rank's share)."""
    h, d, f = arch.hidden_size, arch.kv_channels, arch.ffn_hidden_size
    nq, ng = arch.num_attention_heads, arch.num_query_groups
    tp, size = layout.tensor, layout.dtype_bytes
    sp = tp if layout.sequence_parallel else 1
    norm = (2 * h if kernels.fused_norm else 3 * h) / sp
    norm_stat = (FP32 if kernels.fused_norm else size) / sp  # 1/rms per token
    elements = 2 * norm                                   # attention and MLP norms
    extra_bytes = 2 * norm_stat + nq * FP32 / tp          # norm statistics, log-sum-exp
    if kernels.cp_gathers_kv and layout.context > 1:
        # K and V all-gathered into new tensors (the whole sequence), so the QKV output is not
        # kept; the rotated Q stays local; an int64 natural-order index of the whole sequence.
        elements += nq * d / tp + 2 * ng * d * layout.context / tp
        extra_bytes += 8 * layout.context
    else:
        elements += (nq + 2 * ng) * d / tp                # fused QKV output (V is a view of it)
        elements += (nq + ng) * d / tp                    # rotated Q, K
    elements += 4 * d                                     # RoPE cos/sin of q and of k
    elements += kernels.attention_output_copies * nq * d / tp
    if not sparse:
        elements += 2 * f / tp + (f if kernels.fused_swiglu else 3 * f) / tp
    if arch.qk_layernorm:
        elements += nq * d / tp                           # Q reshaped out of the QKV output: a copy
        extra_bytes += (nq + ng) * (FP32 if kernels.fused_norm else size) / tp
        if not kernels.fused_norm:
            elements += (nq + ng) * d / tp                # the normalised q / k
    per_token = elements * size + extra_bytes
    if sparse:
        per_token += moe_mlp_bytes_per_token(arch, layout, kernels)
    if layout.recompute == "selective":
        per_token -= nq * FP32 / tp + (kernels.attention_output_copies - 1) * nq * d / tp * size
    return per_token


def moe_mlp_bytes_per_token(arch: ModelArch, layout: Layout, kernels: Kernels) -> float:
    """Bytes an MoE layer's router, routed experts and shared expert keep per local token
    (module docstring: balanced routing, alltoall dispatcher, an estimate). Units: bytes per
    token of this CP rank's share."""
    h, size, tp = arch.hidden_size, layout.dtype_bytes, layout.tensor
    sp = tp if layout.sequence_parallel else 1
    num_experts, topk, f_e = arch.num_moe_experts, arch.moe_router_topk, arch.moe_ffn_hidden_size
    router = 2 * num_experts * FP32 + 2 * num_experts + topk * (FP32 + 8)
    if arch.moe_router_pre_softmax:
        router += num_experts * FP32
    swiglu = f_e if kernels.fused_swiglu else 4 * f_e
    experts = topk * ((h + (2 * f_e + swiglu) / tp) * size + FP32)
    shared = 0.0
    f_s = arch.moe_shared_expert_intermediate_size
    if f_s:
        shared = (2 * f_s + (f_s if kernels.fused_swiglu else 3 * f_s)) / tp * size
        if arch.moe_shared_expert_gate:
            shared += h / sp * size + FP32 / sp
    return router / sp + experts + shared


def layer_input_bytes_per_token(arch: ModelArch, layout: Layout) -> float:
    """Bytes of one layer's input per local token (what full recompute keeps per layer)."""
    sp = layout.tensor if layout.sequence_parallel else 1
    return arch.hidden_size * layout.dtype_bytes / sp


def final_norm_bytes_per_token(arch: ModelArch, layout: Layout, kernels: Kernels) -> float:
    """The final RMSNorm's kept tensors per local token. Its output, gathered from the
    sequence-parallel region, is the hidden state the log-prob head keeps (full per TP rank)."""
    h, size = arch.hidden_size, layout.dtype_bytes
    sp = layout.tensor if layout.sequence_parallel else 1
    kept = (h if kernels.fused_norm else 2 * h) / sp * size + (FP32 if kernels.fused_norm else size) / sp
    return kept + h * size


def stored_bytes(arch: ModelArch, layout: Layout, kernels: Kernels, *, num_layers: int,
                 tokens: int, last_stage: bool, in_flight: int = 1,
                 sequence_tokens: int | None = None, num_moe_layers: int = 0) -> int:
    """Activations that ``in_flight`` micro-batches of ``tokens`` local tokens each keep on a
    stage of ``num_layers`` layers (``num_moe_layers`` of them mixture-of-experts layers) until
    their backward, plus (full recompute) the one layer, the largest, the backward recomputes
    at a time. ``sequence_tokens``: the length of each sequence of a micro-batch (default: one
    sequence of all its tokens). Bytes."""
    dense = layer_bytes_per_token(arch, layout, kernels) * tokens
    moe = layer_bytes_per_token(arch, layout, kernels, sparse=True) * tokens if num_moe_layers else 0.0
    num_dense = num_layers - num_moe_layers
    if layout.recompute == "full":
        largest = max(dense if num_dense else 0.0, moe)
        kept = in_flight * num_layers * layer_input_bytes_per_token(arch, layout) * tokens + largest
    else:
        kept = in_flight * (num_dense * dense + num_moe_layers * moe)
    if last_stage:
        kept += in_flight * final_norm_bytes_per_token(arch, layout, kernels) * tokens
    return int(kept)


def backward_transient_bytes(arch: ModelArch, layout: Layout, *, tokens: int, dense: bool = True,
                             moe: bool = False) -> int:
    """Gradients alive inside one layer's backward beyond the stored activations, the larger
    over the kinds of layer of the stage (``dense``, ``moe``): about one [tokens, f/TP] block in
    the model dtype for a dense layer, one [top-k x tokens, f_e/TP] block for an MoE layer
    (both measured on CPU, docs/plan.md). Bytes."""
    width = []
    if dense:
        width.append(arch.ffn_hidden_size)
    if moe:
        width.append(arch.moe_router_topk * arch.moe_ffn_hidden_size)
    return int(tokens * max(width, default=0) / layout.tensor * layout.dtype_bytes)


def logprob_peak_bytes(arch: ModelArch, layout: Layout, *, tokens: int, chunk_tokens: int,
                       padded_vocab: int) -> int:
    """Peak of the chunked log-prob head's backward (:mod:`k15_megatron.rl.logprobs`, weight
    path) on the last stage, beyond the kept hidden states: float32 copies of the output weight
    shard [V/TP, h], of its gradient and of one chunk's contribution to it, the float32 hidden
    gradient [tokens, h], one float32 [chunk, V/TP] block and its [chunk, h] input, then the
    cast of the larger gradient to the model dtype. ``tokens``: this rank's tokens (the hidden states are gathered over sequence
    parallelism, so every TP rank holds all of them). Bytes."""
    h, size = arch.hidden_size, layout.dtype_bytes
    vocab_local = padded_vocab // layout.tensor
    weight32 = vocab_local * h * FP32
    # grad_w, the chunk's product grad_z.T @ x before it is added in, and w.float() (a copy
    # unless the model is float32)
    copies = weight32 * (3 if layout.dtype != "fp32" else 2)
    chunk = min(chunk_tokens, tokens)
    blocks = chunk * vocab_local * FP32 + chunk * h * FP32
    grad_hidden = tokens * h * FP32
    cast = max(tokens * h, vocab_local * h) * size if layout.dtype != "fp32" else 0  # .to(fp32) is a no-op
    return copies + blocks + grad_hidden + cast


def labels_loss_peak_bytes(arch: ModelArch, layout: Layout, *, tokens: int, padded_vocab: int) -> int:
    """Peak of Megatron's own loss path (``k15 sft``: the model's ``labels`` argument): the
    logits [tokens, V/TP] in the model dtype, the float32 softmax its vocab-parallel cross
    entropy keeps, and the float32 logits gradient in backward. Bytes."""
    return tokens * (padded_vocab // layout.tensor) * (layout.dtype_bytes + 2 * FP32)
