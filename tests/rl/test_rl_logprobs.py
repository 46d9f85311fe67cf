"""token_logprobs (chunked, vocab-parallel) vs an independent float64 full-softmax reference.

Single process (both input paths, chunk sizes that do and do not divide the token count,
temperature, entropy) and TP=2 over two gloo processes (vocabulary split in halves).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from k15_megatron.rl.logprobs import token_logprobs

S, B, H, V = 7, 3, 16, 50


def _inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    labels = torch.randint(0, V, (S, B), generator=g)
    grad_lp = torch.randn(S, B, generator=g, dtype=torch.float64)
    grad_ent = torch.randn(S, B, generator=g, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), labels, grad_lp, grad_ent


def _reference(hidden, weight, labels, grad_lp, grad_ent, temperature=1.0):
    """float64 log_softmax over the full vocabulary, entropy, and the gradients of
    sum(grad_lp * lp + grad_ent * entropy) w.r.t. hidden, weight and logits."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logits = torch.einsum("sbh,vh->sbv", h, w)
    logits.retain_grad()
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    lp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    (grad_lp * lp + grad_ent * ent).sum().backward()
    return dict(lp=lp.detach(), ent=ent.detach(), h=h.grad, w=w.grad, logits=logits.grad,
                logits_value=logits.detach())


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("chunk_size", [1, 5, 21, 64])
def test_hidden_path_matches_float64_reference(chunk_size):
    hidden, weight, labels, grad_lp, grad_ent = _inputs()
    ref = _reference(hidden, weight, labels, grad_lp, grad_ent, temperature=0.8)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp, ent = token_logprobs(h, labels, weight=w, chunk_size=chunk_size, temperature=0.8,
                             return_entropy=True)
    assert lp.shape == (S, B) and lp.dtype == torch.float32
    (grad_lp.float() * lp + grad_ent.float() * ent).sum().backward()
    assert _max_err(lp, ref["lp"]) < 1e-5
    assert _max_err(ent, ref["ent"]) < 1e-5
    assert _max_err(h.grad, ref["h"]) < 1e-5
    assert _max_err(w.grad, ref["w"]) < 1e-5


@pytest.mark.parametrize("chunk_size", [4, 1000])
def test_logits_path_matches_float64_reference(chunk_size):
    hidden, weight, labels, grad_lp, grad_ent = _inputs(seed=1)
    ref = _reference(hidden, weight, labels, grad_lp, grad_ent)
    logits = ref["logits_value"].float().requires_grad_(True)
    before = logits.detach().clone()
    lp = token_logprobs(logits, labels, chunk_size=chunk_size)
    (grad_lp.float() * lp).sum().backward()
    ref_lp_only = _reference(hidden, weight, labels, grad_lp, torch.zeros_like(grad_ent))
    assert _max_err(lp, ref["lp"]) < 1e-5
    assert _max_err(logits.grad, ref_lp_only["logits"]) < 1e-6
    assert torch.equal(logits.detach(), before), "the input logits must not be modified"


def test_large_logits_are_stable_and_bf16_input_runs():
    hidden, weight, labels, grad_lp, _ = _inputs(seed=2)
    logits = torch.einsum("sbh,vh->sbv", hidden, weight) * 50.0  # |logits| ~ 1e3: exp overflows
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lp = token_logprobs(logits, labels, chunk_size=8)
    assert torch.isfinite(lp).all()
    assert _max_err(lp, ref) < 1e-6 * ref.abs().max().item() + 1e-5
    h16 = hidden.bfloat16().requires_grad_(True)
    w16 = weight.bfloat16().requires_grad_(True)
    lp16 = token_logprobs(h16, labels, weight=w16, chunk_size=8)
    lp16.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    ref16 = _reference(h16.detach(), w16.detach(), labels, torch.ones(S, B, dtype=torch.float64),
                       torch.zeros(S, B, dtype=torch.float64))
    assert _max_err(lp16, ref16["lp"]) < 1e-4


def test_shape_errors_name_the_argument():
    hidden, weight, labels, _, _ = _inputs()
    with pytest.raises(ValueError, match="labels shape"):
        token_logprobs(hidden, labels[:-1], weight=weight)
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(hidden, labels, weight=weight[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, labels, weight=weight, chunk_size=0)


def _tp2_worker(rank: int, world_size: int) -> dict:
    dist.init_process_group("gloo")
    hidden, weight, labels, grad_lp, grad_ent = _inputs(seed=3)
    # out-of-shard labels on both ranks: the first half of the vocabulary lives on rank 0
    labels[0] = torch.arange(B) * (V // B)
    ref = _reference(hidden, weight, labels, grad_lp, grad_ent, temperature=1.3)
    v_local = V // world_size
    rows = slice(rank * v_local, (rank + 1) * v_local)
    group = dist.group.WORLD

    h = hidden.clone().requires_grad_(True)
    w = weight[rows].clone().requires_grad_(True)
    lp, ent = token_logprobs(h, labels, weight=w, group=group, chunk_size=4, temperature=1.3,
                             return_entropy=True)
    (grad_lp.float() * lp + grad_ent.float() * ent).sum().backward()
    errors = dict(lp=_max_err(lp, ref["lp"]), ent=_max_err(ent, ref["ent"]),
                  h=_max_err(h.grad, ref["h"]), w=_max_err(w.grad, ref["w"][rows]))

    # partial hidden gradients sum to the full one when the caller reduces
    h2 = hidden.clone().requires_grad_(True)
    lp2 = token_logprobs(h2, labels, weight=weight[rows].clone(), group=group, chunk_size=4,
                         temperature=1.3, reduce_hidden_grad=False)
    (grad_lp.float() * lp2).sum().backward()
    partial = h2.grad.clone()
    dist.all_reduce(partial)
    ref_lp = _reference(hidden, weight, labels, grad_lp, torch.zeros_like(grad_ent), 1.3)
    errors["h_partial_sum"] = _max_err(partial, ref_lp["h"])
    errors["h_partial_is_partial"] = _max_err(h2.grad, ref_lp["h"])

    logits = ref_lp["logits_value"][..., rows].float().requires_grad_(True)
    lp3 = token_logprobs(logits, labels, group=group, chunk_size=5, temperature=1.3)
    (grad_lp.float() * lp3).sum().backward()
    errors["logits_lp"] = _max_err(lp3, ref_lp["lp"])
    errors["logits_grad"] = _max_err(logits.grad, ref_lp["logits"][..., rows])
    return errors


@pytest.mark.distributed
def test_tp2_matches_gathered_log_softmax():
    for rank, errors in enumerate(run_distributed(_tp2_worker, 2, timeout_s=180)):
        partial_only = errors.pop("h_partial_is_partial")
        assert partial_only > 1e-3, f"rank {rank}: reduce_hidden_grad=False returned the full grad"
        for name, err in errors.items():
            assert err < 1e-5, f"rank {rank} {name}: max abs error {err:.3g}"


def _padded_worker(rank: int, world_size: int, real_vocab: int) -> dict:
    """Vocabulary padded from ``real_vocab`` to V: padding columns must not enter the softmax."""
    if world_size > 1:
        dist.init_process_group("gloo")
    hidden, weight, labels, grad_lp, grad_ent = _inputs(seed=5)
    labels = labels % real_vocab
    ref = _reference(hidden, weight[:real_vocab], labels, grad_lp, grad_ent)
    v_local = V // world_size
    rows = slice(rank * v_local, (rank + 1) * v_local)
    group = dist.group.WORLD if world_size > 1 else None
    h = hidden.clone().requires_grad_(True)
    w = weight[rows].clone().requires_grad_(True)
    lp, ent = token_logprobs(h, labels, weight=w, group=group, chunk_size=6, return_entropy=True,
                             vocab_size=real_vocab)
    (grad_lp.float() * lp + grad_ent.float() * ent).sum().backward()
    full_w_grad = torch.zeros(V, H, dtype=torch.float64)
    full_w_grad[:real_vocab] = ref["w"]
    return dict(lp=_max_err(lp, ref["lp"]), ent=_max_err(ent, ref["ent"]), h=_max_err(h.grad, ref["h"]),
                w=_max_err(w.grad, full_w_grad[rows]), finite=bool(torch.isfinite(w.grad).all()))


def test_padded_vocabulary_is_excluded_single_process():
    errors = _padded_worker(0, 1, real_vocab=37)
    assert errors.pop("finite")
    for name, err in errors.items():
        assert err < 1e-5, f"{name}: max abs error {err:.3g}"


@pytest.mark.distributed
@pytest.mark.parametrize("real_vocab", [37, 20], ids=["padding-on-last-rank", "last-rank-all-padding"])
def test_padded_vocabulary_is_excluded_tp2(real_vocab):
    for rank, errors in enumerate(run_distributed(_padded_worker, 2, real_vocab, timeout_s=180)):
        assert errors.pop("finite"), f"rank {rank}: non-finite gradient"
        for name, err in errors.items():
            assert err < 1e-5, f"rank {rank} {name}: max abs error {err:.3g}"
