"""DPO loss, its gradient and its metrics against a float64 reference written from the paper's
formula (Rafailov et al. 2023, eq. 7) with the math module."""

import math

import pytest
import torch

from k15_megatron.rl.dpo import chosen_nll, dpo_loss, dpo_metrics

BETA = 0.1


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [(-50 + 20 * torch.rand(6, generator=g, dtype=torch.float64)) for _ in range(4)]


def _reference(pc, pr, rc, rr, beta):
    """loss, d loss / d policy_chosen, d loss / d policy_rejected, per pair, in float64."""
    n = len(pc)
    loss, d_chosen, d_rejected = 0.0, [], []
    for a, b, c, d in zip(pc, pr, rc, rr):
        z = beta * ((a - c) - (b - d))
        loss += math.log1p(math.exp(-z)) / n
        s = 1 / (1 + math.exp(z))  # sigmoid(-z)
        d_chosen.append(-beta * s / n)
        d_rejected.append(beta * s / n)
    return loss, d_chosen, d_rejected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dpo_loss_and_gradient_match_the_formula(dtype):
    pc, pr, rc, rr = _inputs()
    ref_loss, ref_dc, ref_dr = _reference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), BETA)
    chosen, rejected = pc.to(dtype).requires_grad_(), pr.to(dtype).requires_grad_()
    loss = dpo_loss(chosen, rejected, rc.to(dtype), rr.to(dtype), BETA)
    loss.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert loss.dtype == dtype and abs(loss.item() - ref_loss) <= tol * max(1.0, ref_loss)
    assert torch.allclose(chosen.grad.double(), torch.tensor(ref_dc, dtype=torch.float64), rtol=tol * 10, atol=0)
    assert torch.allclose(rejected.grad.double(), torch.tensor(ref_dr, dtype=torch.float64), rtol=tol * 10, atol=0)


def test_dpo_at_the_reference_is_log_2_and_metrics_count_the_wins():
    x = torch.tensor([-3.0, -4.0])
    assert dpo_loss(x, x, x, x, BETA).item() == pytest.approx(math.log(2), abs=1e-7)
    metrics = dpo_metrics(torch.tensor([-1.0, -5.0]), torch.tensor([-2.0, -2.0]),
                          torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), 0.5)
    assert metrics == {"rewards/chosen": pytest.approx(0.5 * (1 - 3) / 2), "rewards/rejected": 0.0,
                       "rewards/margin": pytest.approx(0.5 * (1 - 3) / 2), "rewards/accuracy": 0.5}


def test_bad_inputs_are_refused():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="one length"):
        dpo_loss(x, torch.zeros(2), x, x, BETA)
    with pytest.raises(ValueError, match="non-empty"):
        dpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0), BETA)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, 0.0)


def test_chosen_nll_and_its_gradient_match_the_formula():
    policy = torch.tensor([-6.0, -2.5, -9.0], dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([3, 5, 2])
    nll = chosen_nll(policy, tokens)
    nll.backward()
    assert nll.item() == pytest.approx((6.0 / 3 + 2.5 / 5 + 9.0 / 2) / 3, rel=1e-15)
    assert policy.grad.tolist() == pytest.approx([-1 / (3 * 3), -1 / (3 * 5), -1 / (3 * 2)], rel=1e-15)
    with pytest.raises(ValueError, match="at least one token"):
        chosen_nll(policy.detach(), torch.tensor([3, 0, 2]))
    with pytest.raises(ValueError, match="one length"):
        chosen_nll(policy.detach(), torch.tensor([3, 2]))
