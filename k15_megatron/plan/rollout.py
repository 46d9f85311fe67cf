"""The colocated vLLM engine's share of a GPU (``rollout.*``), as vLLM sizes it.

vLLM takes ``gpu_memory_utilization`` x the GPU's memory for itself: its weights, a profiled
activation peak, CUDA graphs, and the KV cache in whatever is left. The KV cache must hold at
least one ``max_model_len`` sequence, or vLLM refuses to start. KV bytes per token and GPU:
2 (K and V) x layers x KV heads on this GPU x head dim x dtype bytes; vLLM's TP splits the KV
heads (a head is replicated when TP exceeds the KV head count).

Weights: vLLM's tensor parallelism shards every layer, the routed experts of a
mixture-of-experts model included (each GPU holds 1/TP of every expert; no expert parallelism
in the engine), so each GPU holds the model's total parameters / ``rollout.tensor_parallel_size``.

Estimates that are not vLLM's exact profile (stated in the plan's table): activations of one
engine step of ``max_num_batched_tokens`` tokens (default 8192) and the sampler's float32 logits
of ``max_num_seqs`` sequences (an MoE layer's MLP width counted as top-k x the expert width plus the
shared expert); CUDA graphs :data:`CUDA_GRAPH_BYTES` unless ``enforce_eager``.
"""

from __future__ import annotations

from dataclasses import dataclass

from k15_megatron.config.model_arch import ModelArch
from k15_megatron.config.rollout import RolloutConfig
from k15_megatron.plan.layout import ROLLOUT_DTYPE_BYTES

GIB = 1024 ** 3
CUDA_GRAPH_BYTES = 1 * GIB
"""Memory assumed for vLLM's captured CUDA graphs (an estimate, not measured here)."""
DEFAULT_BATCHED_TOKENS = 8192
"""vLLM's default tokens per engine step when ``rollout.max_num_batched_tokens`` is null."""


@dataclass(frozen=True)
class RolloutShare:
    """Bytes of the engine on one GPU."""

    reserved: int
    """What vLLM takes: gpu_memory_utilization x capacity."""
    weights: int
    overhead: int
    """Activations of one step, sampler logits, CUDA graphs (estimates)."""
    kv_cache: int
    """reserved - weights - overhead (negative: vLLM cannot start)."""
    kv_bytes_per_token: int
    max_model_len: int

    @property
    def kv_tokens(self) -> int:
        return max(0, self.kv_cache) // self.kv_bytes_per_token

    @property
    def full_length_sequences(self) -> int:
        """How many ``max_model_len`` sequences the KV cache holds at once."""
        return self.kv_tokens // self.max_model_len


def rollout_dtype_bytes(cfg: RolloutConfig, *, train_dtype_bytes: int) -> int:
    """Bytes per element of the engine: rollout.dtype, or for ``auto`` the checkpoint's dtype
    on GPU, taken to be the training dtype's size."""
    return ROLLOUT_DTYPE_BYTES.get(cfg.dtype, train_dtype_bytes)


def kv_bytes_per_token(arch: ModelArch, *, tensor_parallel: int, dtype_bytes: int) -> int:
    """2 x layers x KV heads per GPU x head dim x dtype bytes; for multi-latent attention
    (DeepSeek-V3) vLLM caches each layer's latent and rotary key instead, on every TP rank:
    layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes (DeepSeek-V2 paper, section 2.1)."""
    if arch.is_mla:
        return arch.num_layers * (arch.kv_lora_rank + arch.qk_pos_emb_head_dim) * dtype_bytes
    heads = max(1, arch.num_query_groups // tensor_parallel)
    return 2 * arch.num_layers * heads * arch.kv_channels * dtype_bytes


def rollout_share(arch: ModelArch, cfg: RolloutConfig, *, num_params: int, capacity: int,
                  train_dtype_bytes: int) -> RolloutShare:
    """The engine's :class:`RolloutShare` on a GPU of ``capacity`` bytes (``num_params``: the
    model's total parameter count, every expert included; ``cfg.max_model_len`` must be
    resolved, as validation does)."""
    tp, size = cfg.tensor_parallel_size, rollout_dtype_bytes(cfg, train_dtype_bytes=train_dtype_bytes)
    reserved = int(cfg.gpu_memory_utilization * capacity)
    weights = num_params * size // tp
    step_tokens = cfg.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS
    h, f = arch.hidden_size, arch.ffn_hidden_size
    if arch.is_moe:  # each token runs through top-k experts (and the shared one)
        f = arch.moe_router_topk * arch.moe_ffn_hidden_size + (arch.moe_shared_expert_intermediate_size or 0)
    activations = step_tokens * (2 * h + 3 * f // tp) * size
    sampler = cfg.max_num_seqs * arch.vocab_size * 4 * 2  # float32 logits and probabilities
    overhead = activations + sampler + (0 if cfg.enforce_eager else CUDA_GRAPH_BYTES)
    return RolloutShare(reserved=reserved, weights=weights, overhead=overhead,
                        kv_cache=reserved - weights - overhead,
                        kv_bytes_per_token=kv_bytes_per_token(arch, tensor_parallel=tp, dtype_bytes=size),
                        max_model_len=cfg.max_model_len)
