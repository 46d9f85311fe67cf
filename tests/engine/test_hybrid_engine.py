"""The colocated hybrid engine under torchrun-style SPMD on 2 CPU processes (gloo).

Megatron and vLLM live in the same two processes. After Megatron training steps change the
weights, ``to_rollout`` syncs them in place and the engine's own check compares vLLM's sampled
token log-probs with Megatron's recomputed ones: they must agree within 1e-4 (float32), in two
different layouts on each side:

* Megatron TP=2 with one vLLM TP=2 engine spanning both processes;
* Megatron PP=2 with one vLLM TP=1 engine per process (two replicas).

The model has tied embeddings (the harder case for vLLM's in-place reload). A second
train/sync round checks that switching back and forth keeps working and that the policy version
is carried to new segments.
"""

import functools

import pytest
import torch
from distributed import run_distributed
from tooling import megatron_from_hf


def _hybrid_worker(rank, world_size, hf_dir, tp, pp, engine_tp):
    from k15_megatron.config.engine import EngineConfig
    from k15_megatron.config.rl import RepeatConfig
    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.engine.hybrid import HybridEngine
    from k15_megatron.engine.weight_sync import ColocatedWeightSync
    from k15_megatron.rollout.engine import RolloutEngine, Sampling, SegmentRequest
    from k15_megatron.train.logprobs import sequence_token_logprobs
    from k15_megatron.train.step import train_step

    arch, model, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, tp=tp, pp=pp, seed=5, lr=1e-2)
    rollout_cfg = RolloutConfig(tensor_parallel_size=engine_tp, max_response_tokens=64, max_model_len=128,
                                cpu_kv_cache_gib=0.25, max_num_seqs=16)
    rollout = RolloutEngine.create(rollout_cfg, model_path=hf_dir, repeat=RepeatConfig(enabled=False), seed=0)
    hybrid = HybridEngine(model_chunks=chunks, optimizer=optimizer, arch=arch, rollout=rollout,
                          weight_sync=ColocatedWeightSync(rollout.llm, dtype=torch.float32),
                          cfg=EngineConfig(check_num_sequences=4, check_max_tokens=24, check_max_abs_diff=1e-4),
                          reset_optimizer=True,
                          recompute_logprobs=functools.partial(sequence_token_logprobs, vocab_size=arch.vocab_size))

    probe = [SegmentRequest(trajectory_id=0, prompt_tokens=torch.tensor([5, 6, 7]),
                            response_tokens=torch.zeros(0, dtype=torch.long), token_budget=12,
                            max_response_tokens=64)]
    greedy = Sampling.from_config(rollout_cfg, temperature=0.0, ignore_eos=True)
    before = rollout.generate(probe, sampling=greedy)[0]

    tokens = torch.randint(3, arch.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    batch = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(32).expand(2, -1)}]
    rounds = []
    for version in (1, 2):
        if hybrid.mode == "rollout":
            hybrid.to_train()
        for _ in range(2):
            train_step(chunks, optimizer, scheduler, batch)
        metrics = hybrid.to_rollout(policy_version=version)
        after = rollout.generate(probe, sampling=greedy)[0]
        rounds.append({"check_max": metrics["logprob_check/max_abs_diff"],
                       "check_tokens": metrics["logprob_check/num_tokens"],
                       "policy_version": rollout.policy_version,
                       "probe_logprobs_changed": not torch.allclose(after.logprobs, before.logprobs, atol=1e-3),
                       "timings": sorted(k for k in metrics if k.startswith("time/"))})
    return rounds


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,engine_tp", [(2, 1, 2), (1, 2, 1)],
                         ids=["megatron-TP2_vllm-TP2", "megatron-PP2_vllm-TP1x2"])
def test_weight_sync_makes_vllm_logprobs_equal_megatron(tiny_hf_dirs, tp, pp, engine_tp):
    per_rank = run_distributed(_hybrid_worker, 2, tiny_hf_dirs["qwen2"], tp, pp, engine_tp, timeout_s=400)
    for rank, rounds in enumerate(per_rank):
        for version, r in enumerate(rounds, start=1):
            assert r["check_tokens"] > 0
            assert r["check_max"] < 1e-4, f"rank {rank} round {version}: max |diff| {r['check_max']:.2e}"
            assert r["policy_version"] == version
            assert r["probe_logprobs_changed"], "training + sync did not change vLLM's outputs"
            assert {"time/sync_s", "time/offload_s", "time/wake_s", "time/logprob_check_s"} <= set(r["timings"])
