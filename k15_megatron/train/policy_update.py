"""One RL iteration's policy update on Megatron: the mirror-descent loss over a RolloutBatch.

``update_policy(trainer, batch, rl_cfg)``:

1. resets the optimizer state (``rl.reset_optimizer``, PAPER.md section 1). The reset is
   idempotent: in ``k15 rl`` the hybrid engine already dropped the state at ``to_rollout``
   (``offload/optimizer_dropped_bytes``), so ``train/optimizer_reset_bytes`` is 0 there;
2. computes log pi_i of every response token: the trainer's own log-probs before any update
   (``rl.reference=recompute``, :func:`k15_megatron.train.logprobs.sequence_token_logprobs` in
   micro-batches of at most ``rl.groups_per_micro_batch * rl.group_size`` rows) or the rollout
   engine's behaviour log-probs;
3. splits this data-parallel rank's groups into ``rl.updates_per_iteration`` mini-batches and
   takes one optimizer step on each, with micro-batches of at most ``rl.groups_per_micro_batch``
   whole groups (:func:`micro_batches`: as few as that bound allows, the last one padded; the
   loss is normalised so that the step is the same whatever the split); per micro-batch the
   loss is :func:`k15_megatron.rl.loss.mirror_descent_loss` of the sequence log-probs, formed
   from the last stage's hidden states and the output weight shard
   (:class:`k15_megatron.train.logprobs.OutputHead`: ``rl.logprob_chunk_tokens`` tokens of
   float32 logits at a time, never the micro-batch's full [S, B, V/TP] logits or their gradient).

Every sample of ``batch`` must already carry its total reward. The batch is the same on every
rank; each data-parallel rank trains on its own contiguous share of the groups. The returned
metrics are global: sums, counts and maxima are all-reduced over the data-parallel group (on the
compute device) before any mean is formed, and equal on every rank.
"""

from __future__ import annotations

import functools

import torch

from k15_megatron.parallel.device import compute_device
from k15_megatron.rl.batch import RolloutBatch
from k15_megatron.rl.loss import mirror_descent_loss, sequence_logprobs
from k15_megatron.rl.mismatch import (finalize_mismatch_metrics, logprob_mismatch_stats, reduce_mismatch_stats,
                                      truncated_is_weights)
from k15_megatron.rl.optim_reset import reset_optimizer_state
from k15_megatron.train.logprobs import hidden_state_output, micro_batch_split, sequence_token_logprobs
from k15_megatron.train.step import global_step_metrics, train_step


def micro_batches(batch: RolloutBatch, ref_logprobs: torch.Tensor, groups_per_micro_batch: int) -> list[dict]:
    """The Megatron micro-batches of one optimizer step on this rank, where ``batch`` lives
    (the schedule moves each to the compute device when it runs).

    The G groups of ``batch`` are cut by :func:`k15_megatron.train.logprobs.micro_batch_split`
    into M = ceil(G / groups_per_micro_batch) micro-batches of P <= groups_per_micro_batch whole
    groups each; the last is padded with empty groups (token 0, no loss mask, reward 0) to the
    same shape, which the loss drops. Each micro-batch holds ``input_ids``/``position_ids``
    [R, T-1], and shifted to label positions ``targets`` [R, T-1] (input_ids[:, 1:]),
    ``loss_mask``, ``behaviour`` and ``reference`` (``ref_logprobs`` [B, T-1] rows) [R, T-1],
    ``rewards`` [R]; R = P * group_size. Plus three counts for the loss's normalisation:
    ``num_samples`` (its real rows), ``step_samples`` (B, the rows of the whole step) and
    ``num_micro_batches`` (M).
    """
    k = batch.group_size
    count, groups = micro_batch_split(batch.num_groups, max_per_micro_batch=groups_per_micro_batch)
    rows, real = groups * k, batch.num_samples
    seq = batch.input_ids.shape[1]

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        pad = tensor.new_zeros((count * rows - real,) + tuple(tensor.shape[1:]))
        return torch.cat([tensor, pad]) if pad.shape[0] else tensor

    ids, loss_mask = padded(batch.input_ids), padded(batch.loss_mask)
    behaviour, reference, rewards = padded(batch.behaviour_logprobs), padded(ref_logprobs), padded(batch.rewards)
    out = []
    for start in range(0, count * rows, rows):
        part = slice(start, start + rows)
        out.append({
            "input_ids": ids[part, :-1],
            "position_ids": torch.arange(seq - 1).unsqueeze(0).expand(rows, -1),
            "targets": ids[part, 1:],
            "loss_mask": loss_mask[part, 1:],
            "behaviour": behaviour[part, 1:],
            "reference": reference[part],
            "rewards": rewards[part],
            "num_samples": min(rows, real - start),
            "step_samples": real,
            "num_micro_batches": count,
        })
    return out


class _LogRatioStats:
    """Per-sample log-ratios d = log pi_theta - log pi_i seen by the loss, kept as
    [count, sum] and [max |d|] on the compute device (this rank's micro-batches)."""

    def __init__(self):
        device = compute_device()
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.abs_max = torch.zeros(1, dtype=torch.float64, device=device)

    def add(self, log_ratio: torch.Tensor) -> None:
        d = log_ratio.detach().double()
        self.sums += torch.stack([torch.tensor(float(d.numel()), dtype=torch.float64, device=d.device), d.sum()])
        if d.numel():
            self.abs_max = torch.maximum(self.abs_max, d.abs().max().reshape(1))

    def global_metrics(self) -> dict[str, float]:
        """Mean and max |d| over every data-parallel rank's samples (collective)."""
        sums, abs_max = global_step_metrics(self.sums, self.abs_max)
        return {"train/log_ratio_mean": float(sums[1] / sums[0].clamp(min=1)),
                "train/log_ratio_abs_max": float(abs_max[0])}


def mirror_descent_loss_fn(rl_cfg, *, token_logprobs, log_ratios: _LogRatioStats | None = None):
    """The loss function (for :func:`k15_megatron.train.schedule.forward_backward`) of one
    micro-batch of :func:`micro_batches`: ``token_logprobs(output, targets)`` -> [R, T-1]
    log-probs -> sequence log-probs under the loss mask -> mirror-descent loss summed over the
    micro-batch's real samples (its padding rows dropped). ``update_policy`` passes the
    chunked hidden-state head (:meth:`OutputHead.token_logprobs`); the memory benchmark also
    passes a plain full-vocabulary one. ``log_ratios`` collects log pi_theta - log pi_i.

    Normalisation: Megatron's schedule divides each micro-batch's returned loss by the count
    returned with it and by the number of micro-batches M (``calculate_per_token_loss`` off),
    and DDP averages the gradients over data-parallel ranks. Micro-batches may hold different
    numbers of samples (the last one of :func:`micro_batches`), so a mean of per-micro-batch
    means would weigh the samples of a small micro-batch more. The loss therefore returns
    (M * sum, B) with B the samples of the whole step on this rank: the gradient is that of
    sum over the step's samples / B whatever the split, and every rank has the same B, so the
    DP average is the mean over all samples of the step. The metrics keep the plain sum and
    the micro-batch's own sample count."""
    def loss(mb: dict, output: torch.Tensor):
        n, step_samples, num_micro_batches = mb["num_samples"], mb["step_samples"], mb["num_micro_batches"]
        token_lp = token_logprobs(output, mb["targets"])[:n]
        mb = {key: mb[key][:n] for key in ("loss_mask", "behaviour", "reference", "rewards")}
        mask = mb["loss_mask"]
        weights = None
        check = rl_cfg.logprob_check
        if check.tis_enabled and check.tis_level == "token":
            weights = truncated_is_weights(mb["behaviour"], mb["reference"], mask, clip=check.tis_clip)
        seq_lp = sequence_logprobs(token_lp, mask, normalize=rl_cfg.normalize,
                                   constant=rl_cfg.normalize_constant, token_weights=weights)
        ref_lp = sequence_logprobs(mb["reference"], mask, normalize=rl_cfg.normalize,
                                   constant=rl_cfg.normalize_constant)
        sample_weights = None
        if check.tis_enabled and check.tis_level == "sequence":
            sample_weights = truncated_is_weights(mb["behaviour"], mb["reference"], mask, clip=check.tis_clip,
                                                  level="sequence")
        loss_sum = mirror_descent_loss(seq_lp, ref_lp, mb["rewards"], rl_cfg.group_size, rl_cfg.tau,
                                       rl_cfg.log_z, sample_weights=sample_weights, reduction="sum")
        if log_ratios is not None:
            log_ratios.add(seq_lp - ref_lp)
        num = torch.tensor(n, dtype=torch.int, device=loss_sum.device)
        step = torch.tensor(step_samples, dtype=torch.int, device=loss_sum.device)
        # Megatron divides the returned loss in place: the metric is a separate tensor.
        return loss_sum * num_micro_batches, step, {"loss_sum": loss_sum.detach().clone(), "num_tokens": num}
    return loss


def _check_shapes(batch: RolloutBatch, rl_cfg) -> None:
    if batch.rewards is None:
        raise ValueError("update_policy needs a batch with rewards")
    if batch.group_size != rl_cfg.group_size:
        raise ValueError(f"batch group size {batch.group_size} != rl.group_size {rl_cfg.group_size}")


def _mismatch_metrics(behaviour: torch.Tensor, recomputed: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Behaviour vs recomputed log-prob drift over every data-parallel rank's tokens (collective)."""
    from megatron.core import parallel_state as ps

    stats = logprob_mismatch_stats(behaviour, recomputed, mask)
    if ps.get_data_parallel_world_size() > 1:
        stats = reduce_mismatch_stats(stats, group=ps.get_data_parallel_group())
    return {f"logprob/{k}": v for k, v in finalize_mismatch_metrics(stats).items()}


def update_policy(trainer, batch: RolloutBatch, rl_cfg) -> dict:
    """Train on ``batch`` (see the module docstring); returns metrics, global over data-parallel
    ranks and equal on all ranks (collective).

    Raises:
        ValueError: the batch has no rewards, a group size other than ``rl.group_size``, or its
            groups do not split evenly over the data-parallel ranks and
            ``rl.updates_per_iteration`` mini-batches (every rank must run the same number of
            equal steps; ``k15 rl`` pops a multiple of DP x updates).
    """
    _check_shapes(batch, rl_cfg)
    layout = trainer.layout
    reset_bytes = reset_optimizer_state(trainer.optimizer) if rl_cfg.reset_optimizer else 0
    mine = batch.shard_groups(layout.dp_rank, layout.dp_size)
    device = compute_device()
    rows_per_micro_batch = rl_cfg.groups_per_micro_batch * mine.group_size
    recomputed = sequence_token_logprobs(trainer.chunks, mine.input_ids, vocab_size=trainer.arch.vocab_size,
                                         micro_batch_size=rows_per_micro_batch,
                                         chunk_size=rl_cfg.logprob_chunk_tokens)
    behaviour = mine.behaviour_logprobs[:, 1:].to(device)
    metrics = _mismatch_metrics(behaviour, recomputed, mine.loss_mask[:, 1:].to(device))
    reference = recomputed if rl_cfg.reference == "recompute" else behaviour

    groups = mine.num_groups
    updates = rl_cfg.updates_per_iteration
    if groups % updates:
        raise ValueError(f"{groups} groups per data-parallel rank cannot be split into "
                         f"rl.updates_per_iteration={updates} equal mini-batches")
    log_ratios = _LogRatioStats()
    per_update = groups // updates
    losses, grad_norms = [], []
    with hidden_state_output(trainer.chunks) as head:
        token_lp = functools.partial(head.token_logprobs, vocab_size=trainer.arch.vocab_size,
                                     chunk_size=rl_cfg.logprob_chunk_tokens)
        loss_fn = mirror_descent_loss_fn(rl_cfg, token_logprobs=token_lp, log_ratios=log_ratios)
        for u in range(updates):
            part = mine.select_groups(torch.arange(u * per_update, (u + 1) * per_update))
            rows = slice(u * per_update * mine.group_size, (u + 1) * per_update * mine.group_size)
            micro = micro_batches(part, reference[rows], rl_cfg.groups_per_micro_batch)
            step = train_step(trainer.chunks, trainer.optimizer, trainer.scheduler, micro, loss_fn=loss_fn)
            losses.append(step["loss"])
            grad_norms.append(step["grad_norm"])
    metrics.update(log_ratios.global_metrics())
    metrics.update({"train/loss": sum(losses) / len(losses), "train/grad_norm": max(grad_norms),
                    "train/lr": step["lr"], "train/updates": float(updates),
                    "train/optimizer_reset_bytes": float(reset_bytes),
                    "train/num_samples": float(mine.num_samples * layout.dp_size),
                    "train/micro_batches_per_update": float(len(micro))})
    return metrics
