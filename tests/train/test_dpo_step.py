"""One DPO step on Megatron equals the DPO loss computed from transformers' logits in float64.

Tiny random Llama (untied embedding), four hand-made pairs of different prompt and response
lengths, one 2-process launch running four layouts (TP=2, PP=2, DP=2, CP=2; Megatron's parallel
state re-initialised between them):

* the reference pass (:func:`reference_logprobs`, chunked head, two sequences per micro-batch,
  each DP rank a share) gives transformers' summed response log-probs of the starting model;
* one :func:`dpo_step` (one pair per packed micro-batch: two micro-batches per rank at TP/PP,
  one per rank at DP=2; at CP=2 each rank holds half of every sequence) against a reference shifted by known offsets (so the margins are not
  zero) gives transformers' float64 DPO loss plus 0.3 x the chosen NLL per token
  (``dpo.sft_loss_weight``), every parameter's gradient (the all-reduced
  ``main_grad`` Megatron's optimizer stepped with, within 1e-4 of each tensor's largest entry)
  and the logged rewards of :func:`k15_megatron.rl.dpo.dpo_metrics`.
"""

from __future__ import annotations

import types

import pytest
import torch
from distributed import run_cases
from tooling import megatron_from_hf

BETA = 0.5
SFT_WEIGHT = 0.3  # dpo.sft_loss_weight: the chosen NLL per token is in the loss and its gradient
OFFSETS = torch.tensor([[0.3, -0.2], [-0.5, 0.4], [0.1, 0.9], [-0.7, -0.1]], dtype=torch.float64)


def _pairs(vocab_size: int):
    from k15_megatron.data.pairs import Pair

    g = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(3, vocab_size, (n,), generator=g).tolist()

    shapes = [(4, 3, 6), (7, 5, 2), (2, 8, 4), (5, 1, 3)]  # (prompt, chosen, rejected) lengths
    return [Pair(ids(p), ids(c), ids(r), line=i + 1) for i, (p, c, r) in enumerate(shapes)]


def _grads_as_hf(model, arch) -> dict:
    """transformers-named full gradients (the DDP-reduced main_grad) of this rank's stage."""
    from k15_megatron.checkpoint.model_weights import iter_hf_tensors

    saved = {}
    for param in model.parameters():
        saved[param] = param.data
        param.data = param.main_grad.to(param.dtype)
    try:
        return {name: tensor.clone() for name, tensor in iter_hf_tensors(model, arch)}
    finally:
        for param, data in saved.items():
            param.data = data


def _step_worker(rank, world_size, hf_dir, tp, pp, cp):
    from megatron.core import parallel_state as ps

    from k15_megatron.train.dpo_step import dpo_step, reference_logprobs

    arch, model, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, tp=tp, pp=pp, cp=cp, lr=1e-3, clip_grad=0.0)
    pairs = _pairs(arch.vocab_size)
    reference = reference_logprobs(chunks, pairs, vocab_size=arch.vocab_size, chunk_size=5, micro_batch_size=2)
    shifted = reference + OFFSETS
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = len(pairs) // dp_size
    mine = slice(dp_rank * share, (dp_rank + 1) * share)
    trainer = types.SimpleNamespace(chunks=chunks, optimizer=optimizer, scheduler=scheduler, arch=arch)
    metrics = dpo_step(trainer, pairs[mine], shifted[mine], beta=BETA, chunk_size=5, pairs_per_micro_batch=1,
                       sft_loss_weight=SFT_WEIGHT)
    return {"reference": reference, "metrics": metrics, "grads": _grads_as_hf(model, arch)}


@pytest.fixture(scope="module")
def runs(tiny_hf_dirs):
    hf_dir = tiny_hf_dirs["llama"]
    return run_cases(2, {"TP2": (_step_worker, (hf_dir, 2, 1, 1)), "PP2": (_step_worker, (hf_dir, 1, 2, 1)),
                         "DP2": (_step_worker, (hf_dir, 1, 1, 1)), "CP2": (_step_worker, (hf_dir, 1, 1, 2))})


def _transformers_dpo(hf_dir: str):
    """(reference [P, 2], loss, rewards, hub-named gradients) in float64 from transformers."""
    from transformers import AutoModelForCausalLM

    from k15_megatron.rl.dpo import dpo_loss, dpo_metrics

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    sums = []
    pairs = _pairs(model.config.vocab_size)
    for pair in pairs:
        for response in (pair.chosen, pair.rejected):
            ids = torch.tensor([pair.prompt + response])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
            token = logprobs.gather(1, ids[0, 1:, None])[:, 0]
            sums.append(token[len(pair.prompt) - 1:].sum())
    policy = torch.stack(sums).view(-1, 2)
    reference = policy.detach() + OFFSETS
    args = (policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1])
    nll = (-policy[:, 0] / torch.tensor([len(pair.chosen) for pair in pairs], dtype=torch.float64)).mean()
    loss = dpo_loss(*args, beta=BETA) + SFT_WEIGHT * nll
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return (policy.detach(), float(loss.detach()), {**dpo_metrics(*args, beta=BETA), "train/chosen_nll": float(nll)},
            grads)


@pytest.mark.distributed
def test_dpo_step_matches_transformers_float64(runs, tiny_hf_dirs):
    start, loss, rewards, ref_grads = _transformers_dpo(tiny_hf_dirs["llama"])
    assert rewards["rewards/margin"] != 0 and 0 < rewards["rewards/accuracy"] < 1  # offsets make the case non-trivial
    for layout, results in runs.items():
        for result in results:
            assert torch.allclose(result["reference"], start, atol=1e-4, rtol=0), (layout, result["reference"], start)
            metrics = result["metrics"]
            assert abs(metrics["train/loss"] - loss) < 1e-5, (layout, metrics["train/loss"], loss)
            for key, value in rewards.items():
                assert abs(metrics[key] - value) < 1e-5, (layout, key, metrics[key], value)
        grads = {}
        for result in results:
            grads.update(result["grads"])
        assert set(grads) == set(ref_grads), (layout, sorted(set(grads) ^ set(ref_grads))[:5])
        for name, ref in ref_grads.items():
            err = float((grads[name].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            assert err < 1e-4, (layout, name, err)
