"""update_policy is the same step whatever the micro-batch split (DP=2, gloo, real GPTModel).

Each data-parallel rank holds 3 groups of a 6-group batch. ``rl.groups_per_micro_batch`` = 3
runs them as one packed micro-batch (the reference); 2 runs two micro-batches, of 2 groups and
of 1; 1 runs three micro-batches. With plain SGD (no clipping, so the parameter change is -lr x
the gradient, unlike Adam's first step, which is nearly sign(g)) the change of every parameter
must equal the reference's, and the loss metric too: Megatron divides each micro-batch's loss by
its count and by the number of micro-batches, so a split into unequal micro-batches would weigh
the lone group twice as much if the loss did not correct for it. Every forward runs one packed
micro-batch [1, tokens] of at most groups_per_micro_batch whole groups, their real tokens only,
also in the reference log-prob recompute (rl.reference=recompute, at most
groups_per_micro_batch x group_size rows). The same holds through the pipeline schedule (PP=2),
whose stages exchange micro-batches of different token counts. Both run in one 2-process launch.
"""

from __future__ import annotations

import types

import pytest
import torch
from distributed import run_cases
from tooling import megatron_from_hf, single_segment_batch

K, TAU, T, GROUPS = 2, 0.1, 12, 6


def _batch(vocab: int):
    """GROUPS groups of K samples of T tokens: 3 prompt tokens, responses of varied length."""
    g = torch.Generator().manual_seed(5)
    b = GROUPS * K
    ids = torch.randint(1, vocab, (b, T), generator=g)
    lengths = torch.randint(2, T - 3 + 1, (b,), generator=g)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.25, 1.0])
    return single_segment_batch(ids, lengths, rewards, group_size=K, prompt_tokens=3, generator=g)


def _split_worker(rank, world_size, hf_dir, pp, groups, splits):
    from megatron.core import parallel_state as ps

    from k15_megatron.config.rl import RLConfig
    from k15_megatron.train.policy_update import update_policy

    arch, model, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, pp=pp, seed=3, lr=0.5, clip_grad=0.0,
                                                                 optimizer="sgd")
    layout = types.SimpleNamespace(dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                                   tp_size=1)
    trainer = types.SimpleNamespace(layout=layout, chunks=chunks, optimizer=optimizer, scheduler=scheduler, arch=arch)
    batch = _batch(arch.vocab_size).select_groups(torch.arange(groups))
    tokens = []
    model.register_forward_pre_hook(lambda m, args: tokens.append(tuple(args[0].shape)))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {}
    for per_micro_batch in splits:
        cfg = RLConfig(group_size=K, tau=TAU, reference="recompute", groups_per_micro_batch=per_micro_batch,
                       logprob_chunk_tokens=5, updates_per_iteration=1)
        tokens.clear()
        metrics = update_policy(trainer, batch, cfg)
        delta = {n: (p.detach() - start[n]).clone() for n, p in model.named_parameters()}
        out[per_micro_batch] = {"metrics": metrics, "delta": delta, "forwards": list(tokens)}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
    mine = batch.shard_groups(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    return {"splits": out, "lengths": mine.attention_mask.sum(1).tolist()}


CASES = {"DP2": (1, GROUPS, (3, 2, 1)), "PP2": (2, 5, (5, 2))}  # name -> (pp, groups, splits)


@pytest.fixture(scope="module")
def per_case(tiny_hf_dirs):
    return run_cases(2, {name: (_split_worker, (tiny_hf_dirs["qwen2"], *case)) for name, case in CASES.items()})


def _forwards(lengths: list[int], per: int) -> list[tuple[int, int]]:
    """The packed forwards [1, tokens] of one update with ``per`` groups per micro-batch: the
    recompute (at most per * K rows each), then the training step (at most per groups each)."""
    rows = len(lengths)
    recompute = [sum(lengths[i:i + per * K]) for i in range(0, rows, per * K)]
    return [(1, n) for n in recompute * 2]  # one step: the same cuts (whole groups of K rows)


def _assert_same_step(rank: int, out: dict, reference: int) -> None:
    """Every split's parameter change and loss equal the one-micro-batch reference's."""
    want_loss = out[reference]["metrics"]["train/loss"]
    scale = max(d.abs().max().item() for d in out[reference]["delta"].values())
    assert scale > 1e-3, "the reference step did not move the weights"
    for per, got in out.items():
        assert abs(got["metrics"]["train/loss"] - want_loss) <= 1e-6 * max(1.0, abs(want_loss))
        for name, want in out[reference]["delta"].items():
            err = (got["delta"][name] - want).abs().max().item()
            assert err <= 1e-5 * scale, (f"rank {rank}, {per} groups per micro-batch: {name} moved "
                                         f"differently from one micro-batch (max diff {err:.3g}, step {scale:.3g})")


@pytest.mark.distributed
def test_update_is_the_same_whatever_the_micro_batch_split(per_case):
    results = per_case["DP2"]
    for rank, r in enumerate(results):
        out = r["splits"]
        for per in (3, 2, 1):
            want = _forwards(r["lengths"], per)
            assert out[per]["forwards"] == want, f"rank {rank}, {per} groups: forwards {out[per]['forwards']} != {want}"
        assert [out[p]["metrics"]["train/micro_batches_per_update"] for p in (3, 2, 1)] == [1.0, 2.0, 3.0]
        _assert_same_step(rank, out, reference=3)
    for per in (3, 2, 1):
        for name, delta in results[0]["splits"][per]["delta"].items():
            assert torch.equal(delta, results[1]["splits"][per]["delta"][name]), \
                f"ranks disagree on {name} after the DP all-reduce"


@pytest.mark.distributed
def test_packed_micro_batches_through_the_pipeline_schedule(per_case):
    """PP=2: 5 groups in micro-batches of at most 2 run as three packed micro-batches of
    different token counts (2, 2 and 1 groups; the stages exchange each shape), the recompute's
    10 rows likewise. Same step as one micro-batch of 5."""
    results = per_case["PP2"]
    for rank, r in enumerate(results):
        out = r["splits"]
        for per in (5, 2):
            want = _forwards(r["lengths"], per)
            assert out[per]["forwards"] == want, f"rank {rank}, {per} groups: forwards {out[per]['forwards']} != {want}"
        assert len({n for _, n in out[2]["forwards"]}) > 1, "the micro-batches should differ in tokens"
        _assert_same_step(rank, out, reference=5)
