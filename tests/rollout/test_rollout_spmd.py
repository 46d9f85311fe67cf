"""The rollout engine created SPMD inside 2 torch.distributed (gloo) processes, as in training:
one TP=2 engine spanning both ranks, then one TP=1 engine per rank (2 vLLM data-parallel
replicas with different requests); both give the single-process engine's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed

from k15_megatron.config.rl import RepeatConfig
from k15_megatron.config.rollout import RolloutConfig
from k15_megatron.rollout import RolloutEngine, Sampling, expand_prompts

CAP = 24
PROMPTS = [[1, 10 + i, 6 + (11 * i) % 90, 12] for i in range(8)]


def _generate(cfg, model_path, prompts):
    engine = RolloutEngine.create(cfg, model_path=model_path, repeat=RepeatConfig(enabled=False),
                                  seed=0)
    reqs = expand_prompts([torch.tensor(p) for p in prompts], k=1, token_budget=CAP,
                          max_response_tokens=CAP)
    greedy = Sampling.from_config(cfg, temperature=0.0, ignore_eos=True)
    tokens = [r.tokens.tolist() for r in engine.generate(reqs, sampling=greedy)]
    return engine, tokens


def _mapped_cpu_shm_segments() -> list[str]:
    """Names of vLLM CPU shared-memory segments this process maps."""
    with open("/proc/self/maps") as f:
        return sorted({line.split("/dev/shm/")[1].strip() for line in f
                       if "/dev/shm/" in line and "-cpushm" in line})


def _two_layouts(rank, world_size, model_path, store_dir):
    """Each layout in turn; vLLM's shutdown destroys the default process group (see
    RolloutEngine.shutdown), so the group is re-created for the second engine."""
    import torch.distributed as dist

    out = {}
    for name, tp in (("tp2", 2), ("dp2", 1)):
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/{name}", rank=rank,
                                world_size=world_size)
        cfg = RolloutConfig(tensor_parallel_size=tp, max_response_tokens=CAP, max_model_len=128,
                            cpu_kv_cache_gib=0.25)
        # TP=2: both ranks of the one replica pass the same requests; DP=2: each replica its
        # own share, of different sizes (4 and 3 prompts)
        mine = PROMPTS if tp == 2 else PROMPTS[rank::2][: 4 - rank]
        engine, tokens = _generate(cfg, model_path, mine)
        out[name] = dict(layout=engine.layout, prompts=mine, tokens=tokens,
                         segments=_mapped_cpu_shm_segments())
        engine.shutdown()
        assert not dist.is_initialized()
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_spmd_engines_generate_the_single_process_greedy_tokens(vllm_engine, roundtrip_dirs,
                                                                tmp_path):
    model_path = roundtrip_dirs["qwen2"][1]
    single = RolloutEngine(vllm_engine, cfg=RolloutConfig(max_response_tokens=CAP,
                                                          max_model_len=512),
                           repeat=RepeatConfig(enabled=False))
    ref_tokens = [r.tokens.tolist() for r in single.generate(
        expand_prompts([torch.tensor(p) for p in PROMPTS], k=1, token_budget=CAP,
                       max_response_tokens=CAP),
        sampling=Sampling.from_config(single.cfg, temperature=0.0, ignore_eos=True))]
    reference = {tuple(p): t for p, t in zip(PROMPTS, ref_tokens)}

    results = run_distributed(_two_layouts, 2, model_path, str(tmp_path), timeout_s=400)

    for rank, res in enumerate(results):
        tp2, dp2 = res["tp2"], res["dp2"]
        assert (tp2["layout"].tensor_parallel_size, tp2["layout"].data_parallel_size) == (2, 1)
        assert tp2["tokens"] == ref_tokens  # one engine over both ranks: same output on each
        # the TP group's shared memory carries a per-job prefix (concurrent jobs never collide)
        assert tp2["segments"] and all(not n.startswith("-") for n in tp2["segments"])
        assert tp2["segments"] == results[0]["tp2"]["segments"]
        assert (dp2["layout"].tensor_parallel_size, dp2["layout"].data_parallel_size,
                dp2["layout"].data_parallel_rank) == (1, 2, rank)
        assert len(dp2["prompts"]) == 4 - rank  # replicas run different batches
        for p, t in zip(dp2["prompts"], dp2["tokens"]):
            assert t == reference[tuple(p)]
    assert results[0]["dp2"]["prompts"] != results[1]["dp2"]["prompts"]
