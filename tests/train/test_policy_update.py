"""update_policy under data parallelism (DP=2, gloo): metrics over both ranks, memory by config.

The two ranks train on different shards (different rewards, behaviour log-probs and lengths).
Every metric update_policy returns must equal the float64 value computed over BOTH shards with
transformers' log-probs of the same weights, on both ranks: the loss, the behaviour-vs-trainer
drift and the loss's log-ratio. And every forward of the model runs one packed micro-batch of
``rl.groups_per_micro_batch * rl.group_size`` responses, their real tokens only (no padding at
CP=1), and returns hidden states (never full-vocabulary logits), while a rank's shard is twice
that.
"""

from __future__ import annotations

import types

import pytest
import torch
from distributed import run_distributed
from tooling import megatron_from_hf, single_segment_batch

K, TAU, T = 2, 0.1, 12


def _batch(vocab: int):
    """8 samples (4 groups of K) of T tokens: 3 prompt tokens, responses of varied length."""
    g = torch.Generator().manual_seed(4)
    b = 8
    ids = torch.randint(1, vocab, (b, T), generator=g)
    lengths = torch.tensor([9, 5, 7, 9, 3, 8, 6, 9])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0])
    return single_segment_batch(ids, lengths, rewards, group_size=K, prompt_tokens=3, generator=g)


def _expected(hf_dir: str, batch) -> dict:
    """The metrics over the whole batch in float64, from transformers' log-probs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    mask = batch.loss_mask[:, 1:].double()
    beh = batch.behaviour_logprobs[:, 1:].double()
    diff = (lp - beh) * mask
    d = (lp * mask).sum(1) - (beh * mask).sum(1)  # log pi_theta - log pi_i per sample (reference=behaviour)
    r = batch.rewards.double()
    baseline = r.view(-1, K).mean(1).repeat_interleave(K)
    return {"train/loss": ((r - baseline - TAU * d) ** 2 / (2 * TAU)).mean().item(),
            "logprob/mean_abs_diff": (diff.abs().sum() / mask.sum()).item(),
            "logprob/max_abs_diff": diff.abs().max().item(),
            "logprob/kl_k1": (-diff.sum() / mask.sum()).item(),
            "logprob/num_tokens": mask.sum().item(),
            "train/log_ratio_mean": d.mean().item(),
            "train/log_ratio_abs_max": d.abs().max().item()}


def _dp_worker(rank, world_size, hf_dir):
    from megatron.core import parallel_state as ps

    from k15_megatron.config.rl import RLConfig
    from k15_megatron.train.policy_update import update_policy

    arch, model, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, seed=3, lr=1e-3)
    layout = types.SimpleNamespace(dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                                   tp_size=1)
    trainer = types.SimpleNamespace(layout=layout, chunks=chunks, optimizer=optimizer, scheduler=scheduler, arch=arch)
    batch = _batch(arch.vocab_size)
    expected = _expected(hf_dir, batch)  # before the update changes the weights
    shapes, widths = [], []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    # True: the output layer passed its input (hidden states) on instead of forming logits
    model.output_layer.register_forward_hook(lambda m, args, out: widths.append(out[0] is args[0]))
    cfg = RLConfig(group_size=K, tau=TAU, reference="behaviour", groups_per_micro_batch=1,
                   logprob_chunk_tokens=5, updates_per_iteration=1)
    metrics = update_policy(trainer, batch, cfg)
    mine = batch.shard_groups(layout.dp_rank, layout.dp_size)
    return {"metrics": metrics, "expected": expected, "shapes": shapes, "widths": widths,
            "lengths": mine.attention_mask.sum(1).tolist(), "shard_rows": mine.num_samples}


@pytest.fixture(scope="module")
def dp_run(tiny_hf_dirs):
    return run_distributed(_dp_worker, 2, tiny_hf_dirs["qwen2"], timeout_s=400)


@pytest.mark.distributed
def test_logged_metrics_are_global_over_data_parallel_ranks(dp_run):
    for rank, r in enumerate(dp_run):
        got, want = r["metrics"], r["expected"]
        for key, value in want.items():
            assert key in got, f"rank {rank}: {key} missing from update_policy's metrics"
            tol = 1e-4 * max(1.0, abs(value))
            assert abs(got[key] - value) <= tol, f"rank {rank} {key}: {got[key]} != {value} (both shards, float64)"
    assert dp_run[0]["metrics"] == dp_run[1]["metrics"], "ranks report different metrics"


@pytest.mark.distributed
def test_forwards_hold_one_packed_micro_batch_of_hidden_states(dp_run):
    for rank, r in enumerate(dp_run):
        assert r["shard_rows"] == 2 * K
        groups = [sum(r["lengths"][g * K:(g + 1) * K]) for g in range(2)]
        # recompute (2 micro-batches) + one training step (2 micro-batches), one group each,
        # packed [1, tokens]: the prompt + response tokens of its K responses, nothing else
        assert r["shapes"] == [(1, n) for n in groups * 2], f"rank {rank}: forwards {r['shapes']} ({groups})"
        assert r["widths"] == [True] * 4, f"rank {rank}: the output layer formed logits ({r['widths']})"
