"""The colocated hybrid engine under torchrun-style SPMD on 2 CPU processes (gloo).

Megatron and vLLM live in the same two processes. After Megatron training steps change the
weights, ``to_rollout`` syncs them in place and the engine's own check compares vLLM's sampled
token log-probs with Megatron's recomputed ones: they must agree within 1e-4 (float32), in these
layouts:

* Megatron TP=2 with one vLLM TP=2 engine spanning both processes (Qwen2: tied embeddings, QKV
  bias; Qwen3: untied output layer, QK-norm): the layouts are aligned, so the sync writes each
  rank's shards straight into its vLLM parameters (engine/aligned_sync.py), which the test
  checks is the path taken;
* Megatron DP=2 (TP=1) with one vLLM TP=1 engine per process: aligned too, every rank writes
  whole tensors; the trainer's parameters are offloaded right after the sync, so vLLM must not
  have kept any of them;
* Megatron PP=2 with one vLLM TP=1 engine per process (two replicas): not aligned, the gathered
  stream through vLLM's ``reload_weights``;
* a mixture-of-experts model, a tiny DeepSeek-V3 (multi-latent attention, sigmoid routing
  whose score-correction bias travels in the stream, ungated shared expert), under Megatron EP=2
  with one vLLM TP=2 engine on vLLM's CPU MLA backend: each rank holds half the experts, the
  gathered stream carries all of them. (Qwen3-MoE's sync runs in tests/jobs/test_rl_job.py, whose
  every trained iteration checks vLLM's log-probs against Megatron's within 1e-4.)

The Qwen2 model has tied embeddings (the harder case for vLLM's in-place reload). A second
train/sync round checks that switching back and forth keeps working and that the policy version
is carried to new segments. The memory steps run for real on CPU: the TP=2 case drops the
optimizer state (``rl.reset_optimizer``), the PP=2 case offloads it and the parameters
(``engine.offload_params``) and trains again after ``to_train`` restored them; each case checks
the bytes reported against the sizes of the tensors it freed.
"""

import functools

import pytest
import torch
from distributed import run_distributed
from tooling import megatron_from_hf


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _hybrid_worker(rank, world_size, hf_dir, tp, pp, ep, engine_tp, reset_optimizer):
    from k15_megatron.config.engine import EngineConfig
    from k15_megatron.config.rl import RepeatConfig
    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.engine.hybrid import HybridEngine
    from k15_megatron.engine.weight_sync import ColocatedWeightSync
    from k15_megatron.rl.optim_reset import optimizer_has_state, state_tensors
    from k15_megatron.rollout.engine import RolloutEngine, Sampling, SegmentRequest
    from k15_megatron.train.logprobs import sequence_token_logprobs
    from k15_megatron.train.step import train_step

    arch, model, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, tp=tp, pp=pp, ep=ep, seed=5, lr=1e-2)
    rollout_cfg = RolloutConfig(tensor_parallel_size=engine_tp, max_response_tokens=64, max_model_len=128,
                                cpu_kv_cache_gib=0.25, max_num_seqs=16)
    rollout = RolloutEngine.create(rollout_cfg, model_path=hf_dir, repeat=RepeatConfig(enabled=False), seed=0)
    hybrid = HybridEngine(model_chunks=chunks, optimizer=optimizer, arch=arch, rollout=rollout,
                          weight_sync=ColocatedWeightSync(rollout.llm, dtype=torch.float32),
                          cfg=EngineConfig(check_num_sequences=4, check_max_tokens=24, check_max_abs_diff=1e-4,
                                           offload_params=not reset_optimizer),
                          reset_optimizer=reset_optimizer,
                          recompute_logprobs=functools.partial(sequence_token_logprobs, vocab_size=arch.vocab_size))

    probe = [SegmentRequest(trajectory_id=0, prompt_tokens=torch.tensor([5, 6, 7]),
                            response_tokens=torch.zeros(0, dtype=torch.long), token_budget=12,
                            max_response_tokens=64)]
    greedy = Sampling.from_config(rollout_cfg, temperature=0.0, ignore_eos=True)
    before = rollout.generate(probe, sampling=greedy)[0]

    tokens = torch.randint(3, arch.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    batch = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(32).expand(2, -1)}]
    params = [p for chunk in chunks for p in chunk.parameters()]
    grads = [buffer.grad_data for chunk in chunks
             for buffer in [*chunk.buffers, *getattr(chunk, "expert_parallel_buffers", [])]]
    rounds = []
    for version in (1, 2):
        onload = hybrid.to_train() if hybrid.mode == "rollout" else {}
        for _ in range(2):
            train_step(chunks, optimizer, scheduler, batch)
        moments = [t for _, _, t in state_tensors(optimizer) if t.dim() > 0]
        expected = {"offload/grad_bytes": _nbytes(grads), "offload/param_bytes": _nbytes(params),
                    "offload/optimizer_bytes": _nbytes(moments),
                    "offload/optimizer_dropped_bytes": _nbytes([t for _, _, t in state_tensors(optimizer)])}
        kept = [p.detach().clone() for p in params]
        metrics = hybrid.to_rollout(policy_version=version)
        after = rollout.generate(probe, sampling=greedy)[0]
        resident = None
        if not reset_optimizer:
            freed = sum(t.untyped_storage().nbytes() for t in params + moments)
            with hybrid.trainer_state_resident():
                resident = all(torch.equal(a, p) for a, p in zip(kept, params))
            resident = resident and freed == 0 == sum(t.untyped_storage().nbytes() for t in params + moments)
        rounds.append({"bytes": {k: v for k, v in metrics.items() if k.startswith("offload/")},
                       "expected": expected, "onload": onload, "resident": resident,
                       "has_state": optimizer_has_state(optimizer),
                       "check_max": metrics["logprob_check/max_abs_diff"],
                       "check_tokens": metrics["logprob_check/num_tokens"],
                       "policy_version": rollout.policy_version,
                       "aligned": metrics["sync/sync_aligned"],
                       "probe_logprobs_changed": not torch.allclose(after.logprobs, before.logprobs, atol=1e-3),
                       "timings": sorted(k for k in metrics if k.startswith("time/"))})
    return rounds


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family,tp,pp,ep,engine_tp,reset_optimizer",
                         [("qwen2", 2, 1, 1, 2, True), ("qwen3", 2, 1, 1, 2, True), ("qwen3", 1, 1, 1, 1, False),
                          ("qwen2", 1, 2, 1, 1, False), ("deepseek_v3", 1, 1, 2, 2, True)],
                         ids=["megatron-TP2_vllm-TP2_reset", "qwen3_megatron-TP2_vllm-TP2_reset",
                              "qwen3_megatron-DP2_vllm-TP1x2_offload-params", "megatron-PP2_vllm-TP1x2_offload-params",
                              "deepseek-v3_megatron-EP2_vllm-TP2_reset"])
def test_weight_sync_makes_vllm_logprobs_equal_megatron(tiny_hf_dirs, tiny_moe_hf_dirs, family, tp, pp, ep, engine_tp,
                                                        reset_optimizer):
    hf_dir = {**tiny_hf_dirs, **tiny_moe_hf_dirs}[family]
    per_rank = run_distributed(_hybrid_worker, 2, hf_dir, tp, pp, ep, engine_tp, reset_optimizer, timeout_s=400)
    for rank, rounds in enumerate(per_rank):
        for version, r in enumerate(rounds, start=1):
            names = {"offload/grad_bytes"} | ({"offload/optimizer_dropped_bytes"} if reset_optimizer else
                                              {"offload/optimizer_bytes", "offload/param_bytes"})
            assert set(r["bytes"]) == names
            assert all(r["bytes"][k] == r["expected"][k] > 0 for k in names), (r["bytes"], r["expected"])
            assert r["has_state"] is not reset_optimizer
            if version == 2:  # to_train put back exactly what to_rollout freed
                assert {k.replace("onload/", "offload/"): v for k, v in r["onload"].items()
                        if k.startswith("onload/")} == {k: v for k, v in rounds[0]["bytes"].items()
                                                         if k != "offload/optimizer_dropped_bytes"}
            if not reset_optimizer:
                assert r["resident"], "trainer_state_resident() did not bring back and free again the weights"
            assert r["check_tokens"] > 0
            assert r["check_max"] < 1e-4, f"rank {rank} round {version}: max |diff| {r['check_max']:.2e}"
            assert r["policy_version"] == version
            # The shard-to-shard write exactly when Megatron's and vLLM's TP layouts coincide.
            assert r["aligned"] == (1.0 if (tp, pp, ep) == (engine_tp, 1, 1) else 0.0)
            assert r["probe_logprobs_changed"], "training + sync did not change vLLM's outputs"
            assert {"time/sync_s", "time/offload_s", "time/wake_s", "time/logprob_check_s"} <= set(r["timings"])
