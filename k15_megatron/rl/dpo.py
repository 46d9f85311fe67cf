"""The DPO objective (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7) on
sequence log-probs, and the metrics DPO training logs.

For a pair (chosen y_w, rejected y_l) with summed response log-probs under the policy (pi) and
the frozen reference (ref), the implicit rewards are

    r_w = beta * (log pi(y_w) - log ref(y_w)),   r_l = beta * (log pi(y_l) - log ref(y_l))

and the loss is -log sigmoid(r_w - r_l), averaged over pairs.

``k15 dpo`` can add the chosen responses' negative log-likelihood per token
(:func:`chosen_nll`, weight ``dpo.sft_loss_weight``): DPO alone may lower the likelihood of the
chosen responses too, as long as the rejected ones fall faster; the SFT term keeps the chosen
ones likely (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 3; NeMo-RL's
``sft_loss_weight``, TRL's ``rpo_alpha``).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F


def _check(*tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or tensors[0].numel() == 0:
        raise ValueError(f"DPO needs four non-empty 1-D tensors of one length (one entry per pair); got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean DPO loss over the pairs.

    Args:
        policy_chosen, policy_rejected: [P] summed log-probs of each pair's chosen / rejected
            response under the policy (differentiable).
        ref_chosen, ref_rejected: [P] the same under the reference model (no gradient needed).
        beta: the KL strength (> 0).

    Returns:
        Scalar, in the policy log-probs' dtype: mean over pairs of
        -log sigmoid(beta * ((pc - rc) - (pr - rr))).

    Raises:
        ValueError: shapes differ, are not 1-D or empty, or beta <= 0.
    """
    _check(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if beta <= 0:
        raise ValueError(f"beta={beta}: DPO's beta must be > 0")
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def dpo_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float) -> Dict[str, float]:
    """What DPO training logs, averaged over the [P] pairs: ``rewards/chosen`` (mean r_w),
    ``rewards/rejected`` (mean r_l), ``rewards/margin`` (mean r_w - r_l) and
    ``rewards/accuracy`` (fraction of pairs with r_w > r_l). Same arguments as :func:`dpo_loss`."""
    _check(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    with torch.no_grad():
        chosen = beta * (policy_chosen - ref_chosen).double()
        rejected = beta * (policy_rejected - ref_rejected).double()
        return {"rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
                "rewards/margin": float((chosen - rejected).mean()),
                "rewards/accuracy": float((chosen > rejected).double().mean())}


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of the chosen response's negative log-likelihood per token.

    Args:
        policy_chosen: [P] summed log-probs of each pair's chosen response under the policy.
        chosen_tokens: [P] its response tokens (> 0).

    Returns:
        Scalar: mean over pairs of -policy_chosen / chosen_tokens.

    Raises:
        ValueError: shapes differ, are not 1-D or empty, or a token count is not positive.
    """
    _check(policy_chosen, chosen_tokens)
    if bool((chosen_tokens <= 0).any()):
        raise ValueError("chosen_nll needs every chosen response to have at least one token")
    return (-policy_chosen / chosen_tokens.to(policy_chosen.dtype)).mean()
