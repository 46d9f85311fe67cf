"""Mirror-descent loss and sequence log-probs vs float64 references written from PAPER.md."""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import pytest
import torch

from k15_megatron.rl.loss import group_baseline, mirror_descent_loss, sequence_logprobs


def _log_z_reference(rewards: list[float], tau: float, mode: str) -> float:
    """tau * log Z of one group, in 50-digit decimal arithmetic (no overflow, no tricks)."""
    if mode == "mean":
        return sum(rewards) / len(rewards)
    getcontext().prec = 50
    t = Decimal(repr(tau))
    mean = sum((Decimal(repr(r)) / t).exp() for r in rewards) / len(rewards)
    return float(t * mean.ln())


def _expected_grad_and_value(lp, lp_ref, r, k, tau, mode):
    """Per sample: (-(r_j - b) + tau (lp_j - lp_ref_j)) / B and the loss value, by loops."""
    n = len(r)
    grads, value = [], 0.0
    for start in range(0, n, k):
        b = _log_z_reference(r[start:start + k], tau, mode)
        for j in range(start, start + k):
            d = lp[j] - lp_ref[j]
            grads.append((-(r[j] - b) + tau * d) / n)
            value += (r[j] - b - tau * d) ** 2 / (2 * tau * n)
    return grads, value


def _case(seed, k=4, prompts=3, tau=0.05):
    g = torch.Generator().manual_seed(seed)
    n = k * prompts
    lp = (-torch.rand(n, generator=g, dtype=torch.float64) * 40)
    lp_ref = lp + torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    r = (torch.rand(n, generator=g, dtype=torch.float64) > 0.5).double()
    r += torch.randn(n, generator=g, dtype=torch.float64) * 0.1  # shaping terms
    return lp, lp_ref, r, k, tau


@pytest.mark.parametrize("mode", ["mean", "exact"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_is_the_papers_eq3(mode, seed):
    lp, lp_ref, r, k, tau = _case(seed)
    x = lp.clone().requires_grad_(True)
    ref_in = lp_ref.clone().requires_grad_(True)
    r_in = r.clone().requires_grad_(True)
    loss = mirror_descent_loss(x, ref_in, r_in, k, tau, log_z=mode)
    loss.backward()
    grads, value = _expected_grad_and_value(lp.tolist(), lp_ref.tolist(), r.tolist(), k, tau, mode)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert torch.allclose(x.grad, torch.tensor(grads, dtype=torch.float64), rtol=1e-10, atol=1e-13)
    assert math.isclose(loss.item(), value, rel_tol=1e-10)
    assert ref_in.grad is None and r_in.grad is None, "reference and rewards carry no gradient"


@pytest.mark.parametrize("tau", [1e-3, 1e-4])
def test_exact_log_z_is_stable_for_large_r_over_tau(tau):
    # r / tau up to 1e4: exp overflows float64 (max ~ 709), the decimal reference does not.
    r = torch.tensor([0.0, 1.0, 1.0, 0.3, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    b = group_baseline(r, 4, tau, "exact")
    for g in range(2):
        expected = _log_z_reference(r[4 * g:4 * g + 4].tolist(), tau, "exact")
        assert torch.allclose(b[4 * g:4 * g + 4], torch.full((4,), expected, dtype=torch.float64),
                              rtol=1e-12, atol=1e-15)
    lp = torch.full((8,), -10.0, dtype=torch.float64, requires_grad=True)
    mirror_descent_loss(lp, lp.detach() - 1.0, r, 4, tau, log_z="exact").backward()
    grads, _ = _expected_grad_and_value(lp.tolist(), (lp.detach() - 1).tolist(), r.tolist(), 4,
                                        tau, "exact")
    assert torch.isfinite(lp.grad).all()
    assert torch.allclose(lp.grad, torch.tensor(grads, dtype=torch.float64), rtol=1e-9)


def test_on_policy_point_and_weights_and_sum_reduction():
    lp, lp_ref, r, k, tau = _case(2)
    w = torch.rand(lp.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = lp.clone().requires_grad_(True)
    mirror_descent_loss(x, lp_ref, r, k, tau, sample_weights=w, reduction="sum").backward()
    grads, _ = _expected_grad_and_value(lp.tolist(), lp_ref.tolist(), r.tolist(), k, tau, "mean")
    expected = torch.tensor(grads, dtype=torch.float64) * len(grads) * w
    assert torch.allclose(x.grad, expected, rtol=1e-10, atol=1e-13)
    # theta == pi_i and all rewards of a group equal: nothing to learn, zero gradient
    same = torch.tensor([1.0] * 4 + [0.0] * 4, dtype=torch.float64)
    y = lp[:8].clone().requires_grad_(True)
    loss = mirror_descent_loss(y, lp[:8], same, 4, tau, log_z="exact")
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and y.grad.abs().max() < 1e-12


def test_argument_errors():
    lp = torch.zeros(6)
    with pytest.raises(ValueError, match="group_size"):
        mirror_descent_loss(lp, lp, lp, 4, 0.1)
    with pytest.raises(ValueError, match="tau"):
        mirror_descent_loss(lp, lp, lp, 3, 0.0)
    with pytest.raises(ValueError, match="log_z"):
        mirror_descent_loss(lp, lp, lp, 3, 0.1, log_z="median")
    with pytest.raises(ValueError, match="same length"):
        mirror_descent_loss(lp, lp[:3], lp, 3, 0.1)


def _seq_case():
    tok = torch.tensor([[-1.0, -2.0, -0.5, float("-inf")], [-0.25, -3.0, -1.0, -4.0]],
                       dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    return tok, mask


def test_sequence_logprobs_sum_and_normalisations():
    tok, mask = _seq_case()
    x = tok.clone().requires_grad_(True)
    total = sequence_logprobs(x, mask)
    assert total.tolist() == [-2.5, -8.25]
    total.sum().backward()
    assert torch.equal(x.grad, mask.double()), "-inf on a padded position must not leak"
    assert sequence_logprobs(tok, mask, normalize="length").tolist() == [-1.25, -8.25 / 4]
    assert sequence_logprobs(tok, mask, normalize="constant", constant=2.0).tolist() == [
        -1.25, -4.125]
    empty = sequence_logprobs(tok, torch.zeros_like(mask), normalize="length")
    assert empty.tolist() == [0.0, 0.0]


def test_token_weights_change_only_the_gradient():
    tok, mask = _seq_case()
    w = torch.tensor([[9.0, 0.5, 2.0, 7.0], [1.0, 0.0, 3.0, 1.5]], dtype=torch.float64)
    x = tok.clone().requires_grad_(True)
    total = sequence_logprobs(x, mask, token_weights=w)
    assert total.tolist() == [-2.5, -8.25]
    (total * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum().backward()
    expected = w * mask.double() * torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("normalize", ["none", "length", "constant"])
def test_packed_sequence_logprobs_and_shares_of_parts(normalize):
    """Three sequences back to back with padding (-1, -inf log-probs there): the packed sums
    equal a loop over each sequence; any split of the tokens into two parts (a CP rank's share)
    gives shares that add up to the whole when the whole response lengths are passed."""
    from k15_megatron.rl.loss import packed_sequence_logprobs

    g = torch.Generator().manual_seed(7)
    ids = torch.tensor([0, 0, 0, 0, -1, 1, 1, -1, -1, 2, 2, 2, 2, 2, 2, -1])
    lp = -torch.rand(ids.numel(), generator=g, dtype=torch.float64) * 5
    lp[ids < 0] = -math.inf
    mask = (torch.rand(ids.numel(), generator=g) > 0.3) & (ids >= 0)
    mask[5:7] = False  # sequence 1: no response token (0 under every normalisation)
    want = []
    for s in range(3):
        values = [lp[i].item() for i in range(ids.numel()) if ids[i] == s and mask[i]]
        norm = {"none": 1.0, "length": max(len(values), 1), "constant": 3.0}[normalize]
        want.append(sum(values) / norm)
    kwargs = dict(num_sequences=3, normalize=normalize, constant=3.0)
    whole = packed_sequence_logprobs(lp[None], mask[None], ids[None], **kwargs)
    assert torch.allclose(whole, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    lengths = torch.tensor([int(mask[ids == s].sum()) for s in range(3)])
    part = torch.rand(ids.numel(), generator=g) > 0.5
    shares = [packed_sequence_logprobs(lp[p][None], mask[p][None], ids[p][None], lengths=lengths, **kwargs)
              for p in (part, ~part)]
    assert torch.allclose(shares[0] + shares[1], whole, rtol=1e-12, atol=1e-15)


def test_packed_sequence_logprobs_token_weights_and_padded_rows_agree():
    """Token weights change only the gradient, as in the row layout; a [B, T] batch gives the
    same values and gradients packed (row index as sequence id) as sequence_logprobs."""
    from k15_megatron.rl.loss import packed_sequence_logprobs

    tok, mask = _seq_case()
    w = torch.tensor([[9.0, 0.5, 2.0, 7.0], [1.0, 0.0, 3.0, 1.5]], dtype=torch.float64)
    rows = torch.arange(2).unsqueeze(1).expand(2, 4)
    x = tok.clone().requires_grad_(True)
    total = packed_sequence_logprobs(x.reshape(1, -1), mask.reshape(1, -1), rows.reshape(1, -1), num_sequences=2,
                                     token_weights=w.reshape(1, -1))
    assert total.tolist() == sequence_logprobs(tok, mask).tolist() == [-2.5, -8.25]
    (total * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum().backward()
    assert torch.equal(x.grad, w * mask.double() * torch.tensor([[1.0], [2.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        packed_sequence_logprobs(tok, mask, rows[:, :3], num_sequences=2)
