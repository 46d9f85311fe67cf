"""One RL iteration's policy update on Megatron: the mirror-descent loss over a RolloutBatch.

``update_policy(trainer, batch, rl_cfg)``:

1. resets the optimizer state (``rl.reset_optimizer``, PAPER.md section 1);
2. computes log pi_i of every response token: the trainer's own log-probs before any update
   (``rl.reference=recompute``) or the rollout engine's behaviour log-probs;
3. splits this data-parallel rank's groups into ``rl.updates_per_iteration`` mini-batches and
   takes one optimizer step on each, with micro-batches of whole groups; per micro-batch the
   loss is :func:`k15_megatron.rl.loss.mirror_descent_loss` of the sequence log-probs
   (:func:`k15_megatron.rl.logprobs.token_logprobs` over the TP-sharded, unpadded vocabulary,
   summed under the loss mask).

Every sample of ``batch`` must already carry its total reward. The batch is the same on every
rank; each data-parallel rank trains on its own contiguous share of the groups.
"""

from __future__ import annotations

import torch

from k15_megatron.rl.batch import RolloutBatch
from k15_megatron.rl.logprobs import token_logprobs
from k15_megatron.rl.loss import mirror_descent_loss, sequence_logprobs
from k15_megatron.rl.mismatch import logprob_mismatch_metrics, truncated_is_weights
from k15_megatron.rl.optim_reset import reset_optimizer_state
from k15_megatron.train.logprobs import sequence_token_logprobs
from k15_megatron.train.step import train_step


def _micro_batches(batch: RolloutBatch, ref_logprobs: torch.Tensor, groups_per_micro_batch: int) -> list[dict]:
    """Megatron micro-batches of whole groups; per-token tensors shifted to label positions."""
    k = batch.group_size
    rows = groups_per_micro_batch * k
    if batch.num_samples % rows:
        raise ValueError(f"{batch.num_groups} groups cannot form micro-batches of "
                         f"rl.groups_per_micro_batch={groups_per_micro_batch}")
    seq = batch.input_ids.shape[1]
    out = []
    for start in range(0, batch.num_samples, rows):
        part = slice(start, start + rows)
        out.append({
            "input_ids": batch.input_ids[part, :-1],
            "position_ids": torch.arange(seq - 1).unsqueeze(0).expand(rows, -1),
            "targets": batch.input_ids[part, 1:],
            "loss_mask": batch.loss_mask[part, 1:],
            "behaviour": batch.behaviour_logprobs[part, 1:],
            "reference": ref_logprobs[part],
            "rewards": batch.rewards[part],
        })
    return out


def _loss_fn(rl_cfg, *, vocab_size: int, tp_group):
    def loss(mb: dict, logits: torch.Tensor):
        token_lp = token_logprobs(logits, mb["targets"], group=tp_group, chunk_size=rl_cfg.logprob_chunk_tokens,
                                  vocab_size=vocab_size)
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
        num = torch.tensor(seq_lp.numel(), dtype=torch.int)
        kl = (seq_lp - ref_lp).detach()
        return loss_sum, num, {"loss_sum": loss_sum.detach().clone(), "num_tokens": num.clone(),
                               "log_ratio_sum": kl.sum(), "log_ratio_abs_max": kl.abs().max()}
    return loss


def _check_shapes(batch: RolloutBatch, rl_cfg) -> None:
    if batch.rewards is None:
        raise ValueError("update_policy needs a batch with rewards")
    if batch.group_size != rl_cfg.group_size:
        raise ValueError(f"batch group size {batch.group_size} != rl.group_size {rl_cfg.group_size}")


def update_policy(trainer, batch: RolloutBatch, rl_cfg) -> dict:
    """Train on ``batch`` (see the module docstring); returns metrics, equal on all ranks."""
    from megatron.core import parallel_state as ps

    _check_shapes(batch, rl_cfg)
    layout = trainer.layout
    reset = reset_optimizer_state(trainer.optimizer) if rl_cfg.reset_optimizer else 0
    mine = batch.shard_groups(layout.dp_rank, layout.dp_size)
    recomputed = sequence_token_logprobs(trainer.chunks, mine.input_ids, vocab_size=trainer.arch.vocab_size,
                                         chunk_size=rl_cfg.logprob_chunk_tokens)
    behaviour = mine.behaviour_logprobs[:, 1:]
    mask = mine.loss_mask[:, 1:]
    metrics = {f"logprob/{k}": float(v) for k, v in logprob_mismatch_metrics(behaviour, recomputed, mask).items()}
    reference = recomputed if rl_cfg.reference == "recompute" else behaviour

    groups = mine.num_groups
    updates = rl_cfg.updates_per_iteration
    if groups % updates:
        raise ValueError(f"{groups} groups per data-parallel rank cannot be split into "
                         f"rl.updates_per_iteration={updates} equal mini-batches")
    tp_group = ps.get_tensor_model_parallel_group() if layout.tp_size > 1 else None
    loss_fn = _loss_fn(rl_cfg, vocab_size=trainer.arch.vocab_size, tp_group=tp_group)
    per_update = groups // updates
    losses, grad_norms = [], []
    for u in range(updates):
        part = mine.select_groups(torch.arange(u * per_update, (u + 1) * per_update))
        rows = slice(u * per_update * mine.group_size, (u + 1) * per_update * mine.group_size)
        micro = _micro_batches(part, reference[rows], rl_cfg.groups_per_micro_batch)
        step = train_step(trainer.chunks, trainer.optimizer, trainer.scheduler, micro, loss_fn=loss_fn)
        losses.append(step["loss"])
        grad_norms.append(step["grad_norm"])
    metrics.update({"train/loss": sum(losses) / len(losses), "train/grad_norm": max(grad_norms),
                    "train/lr": step["lr"], "train/updates": float(updates),
                    "train/optimizers_reset": float(reset), "train/num_samples": float(mine.num_samples * layout.dp_size)})
    return metrics
