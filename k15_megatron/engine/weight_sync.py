"""Weight transports from the Megatron trainer to the vLLM rollout engine.

Each transport has the same two methods: ``sync(model, arch) -> metrics`` pushes the trainer's
current weights into the engine in place, and ``close()``. Today there is one:

* :class:`ColocatedWeightSync`: the vLLM worker lives in the same process as the Megatron rank
  (SPMD colocation, ``external_launcher``). When both shard the model over the same
  tensor-parallel ranks with one pipeline stage (the colocated default for dense text models),
  each rank writes its own Megatron shards straight into its vLLM parameters
  (:mod:`k15_megatron.engine.aligned_sync`: no gather, no whole tensors, vLLM's CPU re-packing
  run per layer). Otherwise the full-model tensor stream of
  :func:`k15_megatron.engine.weight_stream.iter_model_hf_tensors` is handed to vLLM's in-place
  ``reload_weights`` as its weights iterator, so tensors go from Megatron's parameters to vLLM's
  without disk, without a second copy of the model, and (on GPU) without leaving the device.
  Mixture-of-experts models stream every expert on every rank (gathered over the
  expert-parallel group, :mod:`k15_megatron.checkpoint.model_weights`), since vLLM shards each
  expert over its own tensor-parallel ranks. Vision-language models (Qwen2-VL, Qwen2.5-VL)
  stream the vision tower and merger too (``visual.*``), and every sync drops the engine's
  cached image embeddings (:func:`reset_encoder_cache`).

A transport for disaggregated engines (NCCL broadcast to separate inference GPUs) or a disk
fallback would implement the same two methods.
"""

from __future__ import annotations

import logging
import time

import torch

from k15_megatron.engine import aligned_sync
from k15_megatron.engine.weight_stream import iter_model_hf_tensors


def _retie_output_embedding(vllm_model) -> None:
    """Bring vLLM's output layer back in line with the reloaded input embedding.

    With tied embeddings the stream has no ``lm_head.weight``, so vLLM's layerwise reload
    re-processes the embedding module but not the output layer that shares its weight. On CPU
    the output layer keeps a pre-packed GEMM copy of the weight (``dispatch_cpu_unquantized_gemm``)
    that would stay stale: sampled log-probs then came from the pre-sync output layer (vLLM 0.32).
    Re-running the layer's post-load processing rebuilds it; on GPU that processing is a no-op.
    """
    if hasattr(vllm_model, "get_language_model"):  # a vision-language model's text part
        vllm_model = vllm_model.get_language_model()
    lm_head = vllm_model.get_submodule("lm_head")
    embedding = vllm_model.get_submodule("model.embed_tokens")
    if lm_head.weight is not embedding.weight:
        lm_head.weight.data.copy_(embedding.weight.data)
    quant_method = getattr(lm_head, "quant_method", None)
    if quant_method is not None:
        quant_method.process_weights_after_loading(lm_head)


def _repack_routed_experts(vllm_model) -> None:
    """Pack the reloaded routed experts into the CPU experts kernel's layout again.

    At load, vLLM's CPU experts kernel pads and packs ``w13_weight`` / ``w2_weight`` into its
    grouped-GEMM layout. An in-place reload (vLLM 0.32) copies the new weights, in checkpoint
    layout, into those parameters and skips the kernel's packing step on a weight update (it
    only re-runs it when the kernel is first built), so generation read unpacked weights as
    packed ones (log-prob errors of 1.5 nats even for identical weights). Running the kernel's
    own post-load step again packs them. Called on CPU only; on GPU vLLM's kernels take the
    weights as copied (written from vLLM's reload design, not run here).
    """
    for module in vllm_model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if hasattr(module, "w13_weight") and kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)


def is_multimodal(llm) -> bool:
    """True when the vLLM engine ``llm`` runs a multimodal (e.g. vision-language) model."""
    return bool(llm.llm_engine.vllm_config.model_config.is_multimodal_model)


def reset_encoder_cache(llm) -> None:
    """Forget every image embedding the engine has cached (vLLM 0.32:
    ``LLMEngine.reset_encoder_cache`` in vllm/v1/engine/llm_engine.py, which resets the
    scheduler's encoder-cache records and each worker's cached embeddings; ``LLM`` itself has
    no method for it).

    Needed after every weight update: vLLM's scheduler keeps an image's embedding after its
    request finished, and a later request with the same image (same content hash) skips the
    vision tower. A worker's ``reload_weights`` clears the worker's embeddings but not the
    scheduler's records, so without this call the next request with a cached image fails
    with "Encoder cache miss" (measured on the CPU backend: tests/engine/test_vl_hybrid_engine.py);
    were the worker's embeddings kept, the old weights' embedding would be reused silently.
    ``LLM.reset_mm_cache`` is not needed: it drops processed pixel values, which do not depend
    on the weights.
    """
    llm.llm_engine.reset_encoder_cache()


class ColocatedWeightSync:
    """In-place reload of a colocated vLLM engine (see the module docstring)."""

    def __init__(self, llm, *, dtype: torch.dtype, bucket_bytes: int = 256 * 1024**2):
        self.llm, self.dtype, self.bucket_bytes = llm, dtype, bucket_bytes
        self._plans: dict[int, tuple] = {}  # id(model) -> (model, aligned plan or None, reason)

    def plan_for(self, model, arch, vllm_model) -> tuple:
        """(aligned plan or None, why not): decided once per model (collective the first time)."""
        if id(model) not in self._plans:
            plan, reason = aligned_sync.build_plan(model, arch, vllm_model)
            logging.getLogger(__name__).info("weight sync: %s", "each rank's shards written in place (TP-aligned)"
                                             if plan is not None else f"gathered stream ({reason})")
            self._plans[id(model)] = (model, plan, reason)
        return self._plans[id(model)][1:]

    def sync(self, model, arch) -> dict:
        """Push ``model``'s weights into the engine (collective over all ranks); returns
        {"sync_s": seconds, "sync_bytes": bytes written into this rank's engine, "sync_tensors":
        count, "sync_aligned": 1.0 for the TP-aligned shard-to-shard write, 0.0 for the gathered
        stream; with the aligned write also "sync_pack_s": seconds of vLLM's post-load processing
        (the CPU backend's weight re-packing) within sync_s}."""
        start = time.perf_counter()
        counters = {"bytes": 0, "tensors": 0, "aligned": 0.0}

        def counted():
            for name, tensor in iter_model_hf_tensors(model, arch, dtype=self.dtype,
                                                      bucket_bytes=self.bucket_bytes):
                counters["bytes"] += tensor.numel() * tensor.element_size()
                counters["tensors"] += 1
                yield name, tensor

        stream = counted()

        def reload(worker):
            vllm_model = worker.model_runner.get_model()
            plan, _ = self.plan_for(model, arch, vllm_model)
            if plan is not None:
                counters.update(aligned_sync.sync_aligned(plan, model, vllm_model, dtype=self.dtype), aligned=1.0)
                return
            worker.model_runner.reload_weights(weights_iterator=stream)
            if arch.tie_word_embeddings:
                _retie_output_embedding(worker.model_runner.get_model())
            if arch.is_moe and not torch.cuda.is_available():
                _repack_routed_experts(worker.model_runner.get_model())

        self.llm.collective_rpc(reload)
        # Cached KV blocks and image embeddings were computed with the old weights.
        self.llm.reset_prefix_cache()
        if is_multimodal(self.llm):
            reset_encoder_cache(self.llm)
        return {"sync_s": time.perf_counter() - start, **{f"sync_{k}": v for k, v in counters.items()}}

    def close(self) -> None:
        self.llm, self._plans = None, {}
