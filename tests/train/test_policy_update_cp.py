"""One RL policy update under context parallelism equals CP=1's, on packed micro-batches.

One 4-process launch (shared with test_context_parallel_steps.py) runs the same updates (same rollout batch, same start weights: the tiny
Qwen2's) under three layouts, re-initialising Megatron's parallel state in between:
TP=1 x CP=1 x DP=4 (the reference), TP=1 x CP=2 x DP=2 and TP=2 x CP=2 x DP=1. Plain SGD without
clipping, so each parameter's change is -lr x its gradient. Two configurations, each from the
start weights, between them exercise every CP-sensitive part of the update:

* "tis": rl.reference=recompute (the reference log-prob recompute under CP) with
  sequence-level truncated IS (the log-ratio summed over the whole response before the
  truncation); behaviour log-probs are transformers' (float64) plus noise, so the weights are
  near 1 and some are truncated;
* "square": rl.reference=behaviour, so log pi_theta - log pi_i is not 0 at the first step and
  the loss's square is not linear: the CP all-reduce of sequence log-probs must come before it.

Both use rl.normalize=length (the WHOLE response length on every CP rank), a token budget that
cuts several micro-batches of whole groups, and check the gradient scale (DDP averages over
DP x CP). Under CP=2 x DP=2 the "square" update also runs on the same batch with every row
carrying its padding (attention_mask all ones: the rows of a padded [B, T] batch), which must
give the packed update (causal attention: no token sees the padding after it).

Tolerance (float32): every parameter's change within 3e-5 x the largest change of the
reference (measured: <= 8e-6); metrics within 1e-5 relative.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tooling import megatron_from_hf, single_segment_batch

K, TAU, T, GROUPS = 2, 0.1, 40, 4
LAYOUTS = ((1, 1), (1, 2), (2, 2))  # (TP, CP) over 4 processes
METRICS = ("train/loss", "train/log_ratio_mean", "train/log_ratio_abs_max", "logprob/mean_abs_diff",
           "logprob/num_tokens")


def _batch(hf_dir: str, vocab: int):
    """GROUPS groups of K responses, a long-tailed length mix (one near T), behaviour log-probs
    = transformers' log-probs + N(0, 0.05) noise on response tokens."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(21)
    ids = torch.randint(1, vocab, (GROUPS * K, T), generator=g)
    lengths = torch.tensor([4, 9, 36, 6, 3, 12, 7, 5])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.25])
    batch = single_segment_batch(ids, lengths, rewards, group_size=K, prompt_tokens=3, generator=g)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    with torch.no_grad():
        logits = model(batch.input_ids).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    noisy = torch.cat([torch.zeros(batch.num_samples, 1, dtype=torch.float64), lp], 1)
    noisy = noisy + 0.05 * torch.randn(noisy.shape, generator=g, dtype=torch.float64)
    batch.behaviour_logprobs = torch.where(batch.response_mask, noisy, torch.zeros_like(noisy)).float()
    return batch


def _configs() -> dict:
    from k15_megatron.config.rl import LogprobCheckConfig, RLConfig

    common = dict(group_size=K, tau=TAU, normalize="length", groups_per_micro_batch=2, logprob_chunk_tokens=16,
                  updates_per_iteration=1)
    tis = LogprobCheckConfig(tis_enabled=True, tis_level="sequence", tis_clip=1.1)
    return {"tis": RLConfig(reference="recompute", logprob_check=tis, **common),
            "square": RLConfig(reference="behaviour", **common)}


def _updates(hf_dir, tp, cp, cases) -> dict:
    """{case: (metrics, {hf name: full tensor change})} of update_policy under (TP, CP), each
    case (batch, config) from the same start weights."""
    import types

    from megatron.core import parallel_state as ps

    from k15_megatron.checkpoint.model_weights import iter_hf_tensors
    from k15_megatron.parallel.initialize import current_layout
    from k15_megatron.train.policy_update import update_policy

    arch, model, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, tp=tp, cp=cp, seed=3, lr=0.5,
                                                                 clip_grad=0.0, optimizer="sgd")
    trainer = types.SimpleNamespace(layout=current_layout(), chunks=chunks, optimizer=optimizer,
                                    scheduler=scheduler, arch=arch)
    params = [p.detach().clone() for p in model.parameters()]
    start = {name: full.clone() for name, full in iter_hf_tensors(model, arch)}  # may alias a parameter
    out = {}
    for case, (batch, cfg) in cases.items():
        with torch.no_grad():
            for p, saved in zip(model.parameters(), params):
                p.copy_(saved)
        metrics = update_policy(trainer, batch.to("cpu"), cfg, micro_batch_tokens=48)  # a host batch
        out[case] = metrics, {name: (full - start[name]).clone() for name, full in iter_hf_tensors(model, arch)}
    ps.destroy_model_parallel()
    return out


def update_worker(rank, world_size, hf_dir):
    from k15_megatron.config import ModelConfig, resolve_model_arch

    batch = _batch(hf_dir, resolve_model_arch(ModelConfig(hf_path=hf_dir)).vocab_size)
    configs = _configs()
    padded = dataclasses.replace(batch, attention_mask=torch.ones_like(batch.attention_mask))
    out = {}
    for tp, cp in LAYOUTS:
        cases = {(f"TP={tp} CP={cp}", name): (batch, cfg) for name, cfg in configs.items()}
        if (tp, cp) == (1, 2):
            cases[("padded rows, CP=2", "square")] = (padded, configs["square"])
        out.update(_updates(hf_dir, tp, cp, cases))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_update_under_context_parallelism_equals_cp1(context_parallel_launch):
    results = context_parallel_launch["update"]
    for (layout, config), (metrics, delta) in results[0].items():
        reference_metrics, reference = results[0][("TP=1 CP=1", config)]
        scale = max(d.abs().max().item() for d in reference.values())
        assert scale > 1e-3, f"{config}: the reference update did not move the weights"
        for key in METRICS:
            want = reference_metrics[key]
            assert abs(metrics[key] - want) <= 1e-5 * max(1.0, abs(want)), \
                f"{layout}, {config}: {key} {metrics[key]} != CP=1's {want}"
        for name, want in reference.items():
            err = (delta[name] - want).abs().max().item()
            assert err <= 3e-5 * scale, (f"{layout}, {config}: {name} moved differently from CP=1 "
                                         f"(max diff {err:.3g}, largest change {scale:.3g})")
    for rank, out in enumerate(results[1:], start=1):
        for case, (metrics, delta) in out.items():
            assert metrics == results[0][case][0], f"rank {rank}, {case}: metrics differ from rank 0's"
            for name, want in results[0][case][1].items():
                assert torch.equal(delta[name], want), f"rank {rank}, {case}: {name} differs from rank 0's"
