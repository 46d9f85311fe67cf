"""Online policy mirror descent: sequence log-probs, the group baseline and the surrogate loss.

PAPER.md section 1. Iteration i samples k responses per prompt from the reference pi_i and fits
pi_theta by the squared surrogate

    L = E [ (r - tau log Z - tau (log pi_theta - log pi_i))^2 ].

Everything here is a pure function of local tensors. The mean over samples is local; a trainer
that splits one iteration's batch over data-parallel ranks (never splitting a group: the baseline
needs all k rewards of a prompt) uses ``reduction="sum"`` and divides by the global sample count.
:func:`packed_sequence_logprobs` forms sequence log-probs of a packed (THD) batch, or the share of
them that part of each sequence holds (a context-parallel rank's tokens); summing the shares
over the parts, before the loss squares anything, is the caller's collective.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from k15_megatron.config.rl import LOG_Z_MODES, NORMALIZE_MODES


def sequence_logprobs(
    token_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    normalize: str = "none",
    constant: float = 1.0,
    token_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log pi(y, z | x) per sample: the sum of the response's token log-probs.

    Args:
        token_logprobs: [B, T] log-prob of each token (any float dtype); entries outside the mask
            are ignored (they may be garbage, not NaN/inf-safe: they are multiplied by 0).
        response_mask: [B, T] bool/0-1; True on the response tokens that count.
        normalize: "none" (the report: plain sum), "length" (sum / number of masked tokens,
            0 for an empty response), or "constant" (sum / ``constant``).
        token_weights: optional [B, T] detached weights (e.g. truncated importance ratios). They
            change only the GRADIENT: d out_b / d token_logprobs[b, t] = w[b, t] * mask / norm,
            while the returned value stays the unweighted sum. That keeps tau*(lp - lp_ref) in
            the mirror-descent coefficient an honest log-ratio.

    Returns:
        [B] float32 (or float64 if the input is float64).
    """
    if token_logprobs.shape != response_mask.shape or token_logprobs.dim() != 2:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same [B, T] shape")
    rows, length = token_logprobs.shape
    row_ids = torch.arange(rows, device=token_logprobs.device).unsqueeze(1).expand(rows, length)
    return packed_sequence_logprobs(token_logprobs, response_mask, row_ids, num_sequences=rows,
                                    normalize=normalize, constant=constant, token_weights=token_weights)


def packed_sequence_logprobs(
    token_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    *,
    num_sequences: int,
    normalize: str = "none",
    constant: float = 1.0,
    lengths: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`sequence_logprobs` of sequences laid out in any order: token i belongs to sequence
    ``sequence_ids[i]`` (a packed batch; -1 marks padding, which is ignored).

    The tensors may hold only PART of each sequence (e.g. one context-parallel rank's tokens):
    the result is then that part's share, and the shares of all parts add up to the whole
    sequence's value, provided ``lengths`` gives each sequence's WHOLE count of response tokens
    (the division by it is linear, so it may come before the sum over parts).

    Args:
        token_logprobs, response_mask, token_weights: as in :func:`sequence_logprobs`, any one
            shape (e.g. [1, T]) shared with ``sequence_ids``.
        sequence_ids: int64, same shape, values in [-1, num_sequences).
        num_sequences: N, the length of the result.
        lengths: [N] response tokens of each whole sequence, for ``normalize="length"``
            (default: counted from ``response_mask``, right when the tensors hold whole
            sequences).

    Returns:
        [N] float32 (float64 for float64 input); sums use ``index_add`` (deterministic on CUDA
        under ``torch.use_deterministic_algorithms``).
    """
    if not (token_logprobs.shape == response_mask.shape == sequence_ids.shape):
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)}, response_mask "
                         f"{tuple(response_mask.shape)} and sequence_ids {tuple(sequence_ids.shape)} "
                         "must have the same shape")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if normalize == "constant" and constant <= 0:
        raise ValueError(f"normalize='constant' needs constant > 0, got {constant}")
    dtype = torch.float64 if token_logprobs.dtype == torch.float64 else torch.float32
    lp = token_logprobs.reshape(-1).to(dtype)
    mask = response_mask.reshape(-1).to(dtype)
    # Padding goes to an extra bin N that is dropped (no boolean indexing: no host sync).
    ids = sequence_ids.reshape(-1).to(device=lp.device, dtype=torch.int64)
    ids = torch.where(ids < 0, torch.full_like(ids, num_sequences), ids)

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(num_sequences + 1).index_add(0, ids, values)[:num_sequences]

    # torch.where, not multiply: a -inf log-prob on a padded position must not poison the sum.
    masked = torch.where(mask > 0, lp, torch.zeros_like(lp)) * mask
    total = per_sequence(masked)
    if token_weights is not None:
        w = token_weights.detach().reshape(-1).to(dtype)
        weighted = per_sequence(masked * w)
        total = weighted + (total - weighted).detach()
    if normalize == "length":
        count = per_sequence(mask) if lengths is None else lengths.to(device=total.device, dtype=dtype)
        total = total / count.clamp(min=1.0)
    elif normalize == "constant":
        total = total / constant
    return total


def group_baseline(rewards: torch.Tensor, group_size: int, tau: float,
                   log_z: str = "mean") -> torch.Tensor:
    """The per-sample estimate b of tau * log Z from the k rewards of its group.

    Args:
        rewards: [B] with B = prompts * group_size; each group's k rewards are contiguous.
        log_z: "mean" -> b = mean_j r_j (the report's practical choice);
            "exact" -> b = tau * log(mean_j exp(r_j / tau)), computed with logsumexp so that
            r / tau of order 1e3 and beyond stays finite.

    Returns:
        [B] (each group's value repeated k times), same dtype as rewards, no gradient.
    """
    if log_z not in LOG_Z_MODES:
        raise ValueError(f"log_z must be one of {LOG_Z_MODES}, got {log_z!r}")
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} cannot be split into groups "
                         f"of group_size={group_size}")
    r = rewards.detach().view(-1, group_size)
    if log_z == "mean":
        b = r.mean(dim=1)
    else:
        b = tau * (torch.logsumexp(r / tau, dim=1) - math.log(group_size))
    return b.repeat_interleave(group_size)


def mirror_descent_loss(
    seq_logprobs: torch.Tensor,
    ref_seq_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    tau: float,
    log_z: str = "mean",
    *,
    sample_weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The mirror-descent surrogate, scaled so its gradient is exactly the report's eq. 3.

    With d_j = seq_logprobs_j - ref_seq_logprobs_j and b_j the group's tau*log Z estimate
    (``group_baseline``), the returned value is

        loss = 1 / (2 tau B) * sum_j w_j * (r_j - b_j - tau * d_j)^2

    (w_j = 1 without ``sample_weights``; ``reduction="sum"`` drops the 1/B). Its gradient is

        d loss / d seq_logprobs_j = w_j * (-(r_j - b_j) + tau * d_j) / B,

    i.e. minus the per-sample term of eq. 3, averaged over all B samples. The value is >= 0 and
    equals (r - b)^2 / (2 tau) averaged when theta == pi_i; it is a diagnostic, not an objective
    value comparable across taus.

    Args:
        seq_logprobs: [B] log pi_theta(y_j, z_j | x), carries the gradient.
        ref_seq_logprobs: [B] log pi_i(y_j, z_j | x) of the reference; detached here.
        rewards: [B] total rewards (task + shaping); detached here.
        group_size: k; B must be a multiple of k and each prompt's k samples contiguous.
        tau: the KL weight, > 0.
        log_z: "mean" | "exact", see ``group_baseline``.
        sample_weights: optional [B] detached weights (sequence-level truncated IS ratios).
        reduction: "mean" (divide by B) | "sum".

    Returns:
        A scalar in the dtype of seq_logprobs.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    shape = seq_logprobs.shape
    if seq_logprobs.dim() != 1 or ref_seq_logprobs.shape != shape or rewards.shape != shape:
        raise ValueError(f"seq_logprobs {tuple(shape)}, ref_seq_logprobs "
                         f"{tuple(ref_seq_logprobs.shape)} and rewards {tuple(rewards.shape)} "
                         "must all be 1-D of the same length")
    dtype = seq_logprobs.dtype
    r = rewards.detach().to(dtype)
    b = group_baseline(r, group_size, tau, log_z)
    residual = r - b - tau * (seq_logprobs - ref_seq_logprobs.detach().to(dtype))
    per_sample = residual.square() / (2.0 * tau)
    if sample_weights is not None:
        if sample_weights.shape != shape:
            raise ValueError(f"sample_weights {tuple(sample_weights.shape)} must be {tuple(shape)}")
        per_sample = per_sample * sample_weights.detach().to(dtype)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()
