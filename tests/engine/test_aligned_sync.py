"""The TP-aligned weight sync's local re-layout against the gathered stream, bit for bit.

Two CPU processes (gloo), Megatron TP=2 and one vLLM TP=2 engine over the same two processes, for
Llama (untied, llama3 RoPE), Qwen2 (tied embeddings, QKV bias) and Qwen3 (QK-norm). After the
Megatron weights are changed (so they differ from what the engine loaded), each rank-local
tensor the aligned sync writes (:func:`k15_megatron.engine.aligned_sync.iter_local_tensors`)
must equal, bit for bit, what vLLM's own weight loaders put into that parameter from the
gathered full-model stream (:func:`k15_megatron.engine.weight_stream.iter_model_hf_tensors`,
the fallback path): the engine's layers are put back into their loaded (pre-packing) form with
vLLM's own reload helpers and ``model.load_weights`` runs on the stream. The tiny models'
vocabulary (Megatron padded to 256, vLLM to 64 rows) puts rank 1's vLLM rows outside its
Megatron rows, so the vocabulary gather case runs too. Whether the engine then computes with
the written weights is tests/engine/test_hybrid_engine.py's concern.
"""

import pytest
import torch
from distributed import run_distributed
from tooling import megatron_from_hf


def _aligned_vs_gathered_worker(rank, world_size, hf_dir):
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import materialize_layer, restore_layer_on_meta

    from k15_megatron.config.rl import RepeatConfig
    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.engine import aligned_sync
    from k15_megatron.engine.weight_stream import iter_model_hf_tensors
    from k15_megatron.rollout.engine import RolloutEngine

    arch, model, _, _, _ = megatron_from_hf(hf_dir, tp=2, seed=5)
    rollout_cfg = RolloutConfig(tensor_parallel_size=2, max_response_tokens=8, max_model_len=64,
                                cpu_kv_cache_gib=0.25, max_num_seqs=2)
    rollout = RolloutEngine.create(rollout_cfg, model_path=hf_dir, repeat=RepeatConfig(enabled=False), seed=0)
    generator = torch.Generator().manual_seed(11)  # the same on both ranks: replicated norms stay equal
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)

    def compare(worker):
        vllm_model = worker.model_runner.get_model()
        plan, reason = aligned_sync.build_plan(model, arch, vllm_model)
        assert plan is not None, reason
        ours = {entry.vllm_name: (tensor.clone(), rows)
                for _, written in aligned_sync.iter_local_tensors(plan, model, dtype=torch.float32)
                for entry, tensor, rows, _ in written}
        for module in vllm_model.modules():  # back to the loaded, unpacked form, as a reload does
            info = get_layerwise_info(module)
            restore_layer_on_meta(module, info)
            materialize_layer(module, info)
        vllm_model.load_weights(iter_model_hf_tensors(model, arch, dtype=torch.float32))
        loaded = dict(vllm_model.named_parameters())
        report = {}
        for name, (tensor, rows) in ours.items():
            reference = loaded[name].detach()
            expected = reference if rows is None else reference[:rows]
            padding_zero = rows is None or not reference[rows:].any()
            report[name] = (tuple(tensor.shape) == tuple(expected.shape) and torch.equal(tensor, expected)
                            and padding_zero)
        return {"equal": report, "gather_vocab": plan.gather_vocab, "num_params": len(loaded)}

    (result,) = rollout.llm.collective_rpc(compare)
    rollout.shutdown()
    return result


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_aligned_shards_equal_what_vllm_loads_from_the_gathered_stream(tiny_hf_dirs, tmp_path, family):
    from k15_megatron.models.tiny import save_tiny_hf_model

    hf_dir = tiny_hf_dirs[family]
    if family == "qwen3":  # vocabulary row ranges that differ between Megatron and vLLM
        hf_dir = save_tiny_hf_model(str(tmp_path / "qwen3_vocab300"), "qwen3", init_std=0.1, vocab_size=300)
    per_rank = run_distributed(_aligned_vs_gathered_worker, 2, hf_dir, timeout_s=400)
    for rank, result in enumerate(per_rank):
        different = sorted(name for name, same in result["equal"].items() if not same)
        assert not different, f"rank {rank}: aligned tensors differ from vLLM's loaded ones: {different}"
        names = set(result["equal"])
        assert any(".qkv_proj.weight" in n for n in names) and any(".gate_up_proj." in n for n in names)
        assert "model.embed_tokens.weight" in names
        assert ("lm_head.weight" in names) is (family != "qwen2")  # Qwen2's is tied to the embedding
        if family == "qwen2":
            assert any(".qkv_proj.bias" in n for n in names)
        if family == "qwen3":
            assert any(".q_norm.weight" in n for n in names)
        assert result["gather_vocab"] is (family == "qwen3")
