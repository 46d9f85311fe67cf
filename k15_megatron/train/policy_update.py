"""One RL iteration's policy update on Megatron: the mirror-descent loss over a RolloutBatch.

``update_policy(trainer, batch, rl_cfg, micro_batch_tokens=...)``:

1. resets the optimizer state (``rl.reset_optimizer``, PAPER.md section 1). The reset is
   idempotent: in ``k15 rl`` the hybrid engine already dropped the state at ``to_rollout``
   (``offload/optimizer_dropped_bytes``), so ``train/optimizer_reset_bytes`` is 0 there;
2. computes log pi_i of every response token: the trainer's own log-probs before any update
   (``rl.reference=recompute``, :func:`k15_megatron.train.logprobs.sequence_token_logprobs` on
   each response's real length) or the rollout engine's behaviour log-probs;
3. splits this data-parallel rank's groups into ``rl.updates_per_iteration`` mini-batches and
   takes one optimizer step on each. The micro-batches are PACKED (:func:`packed_micro_batches`):
   each response's real tokens (prompt + response) back to back, padded only to the multiple
   context and sequence parallelism need, whole groups per micro-batch (the baseline needs a
   group's k rewards) up to a token budget and at most ``rl.groups_per_micro_batch`` groups.
   Per micro-batch the loss is :func:`k15_megatron.rl.loss.mirror_descent_loss` of the sequence
   log-probs (:func:`mirror_descent_loss_fn`), formed from the last stage's hidden states and
   the output weight shard (:class:`k15_megatron.train.logprobs.OutputHead`:
   ``rl.logprob_chunk_tokens`` tokens of float32 logits at a time, never full logits).

Vision-language models (Qwen2-VL / Qwen2.5-VL): every row is trained with its prompt's images
(``images``: prompt id -> image inputs, the prompt set's ``pixels_of``), each packed sequence
with its own M-RoPE positions [3, L] and its images, as ``k15 sft`` packs its examples; the
recompute runs the same rows as padded image micro-batches. Context parallelism is not built
for these models (refused before start-up).

Context parallelism: each CP rank holds its load-balanced share of every sequence
(:mod:`k15_megatron.parallel.context`); its token log-probs give partial sequence sums, which
are all-reduced over the CP group (forward all-reduce, backward identity) BEFORE the loss
squares them, so every CP rank computes the same loss, equal to CP=1's.

Every sample of ``batch`` must already carry its total reward. The batch is the same on every
rank; each data-parallel rank trains on its own contiguous share of the groups. The returned
metrics are global: sums, counts and maxima are all-reduced over the data-parallel group (on the
compute device) before any mean is formed, and equal on every rank.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from k15_megatron.models.gpt import unwrap_model
from k15_megatron.parallel.context import padded_length
from k15_megatron.parallel.device import compute_device
from k15_megatron.rl.batch import RolloutBatch
from k15_megatron.rl.loss import mirror_descent_loss, packed_sequence_logprobs
from k15_megatron.rl.mismatch import (finalize_mismatch_metrics, logprob_mismatch_stats, reduce_mismatch_stats,
                                      truncated_is_weights)
from k15_megatron.rl.optim_reset import reset_optimizer_state
from k15_megatron.train.logprobs import hidden_state_output, sequence_token_logprobs
from k15_megatron.train.moe_metrics import RoutingMetrics
from k15_megatron.train.packed import next_token, pack_sequences, split_to_count, token_budget_groups
from k15_megatron.train.schedule import micro_batch_count, packing_multiple
from k15_megatron.train.step import global_step_metrics, train_step


def response_sequences(batch: RolloutBatch, reference: torch.Tensor, *, images: list | None = None,
                       vision=None) -> list[dict]:
    """One dict of 1-D host tensors per sample, of its real length L (prompt + response, the
    ``attention_mask`` count): ``input_ids`` [L] and, at each position, the next token's
    ``targets``, ``loss_mask``, ``behaviour`` and ``reference`` log-prob [L] (0 / False at the
    last position). ``reference`` [B, T-1] is aligned with label positions
    (``reference[b, t]`` is the log-prob of ``input_ids[b, t + 1]``).

    ``vision`` (a vision-language model's VisionArch): every sample also gets its own M-RoPE
    ``position_ids`` [3, L] (:func:`k15_megatron.models.qwen2_vl.sequence_mrope_positions`),
    and sample b with ``images[b]`` (None or ``{"pixel_values", "image_grid_thw"}`` of its
    prompt's images) carries those tensors, which packing concatenates in sequence order."""
    reference = reference.detach().to("cpu", torch.float32)
    out = []
    for b, length in enumerate(batch.attention_mask.sum(dim=1).tolist()):
        sequence = {
            "input_ids": batch.input_ids[b, :length],
            "targets": next_token(batch.input_ids[b][:length]),
            "loss_mask": next_token(batch.loss_mask[b][:length]),
            "behaviour": next_token(batch.behaviour_logprobs[b].float()[:length]),
            "reference": torch.cat([reference[b, :length - 1], reference.new_zeros(1)]),
        }
        if vision is not None:
            from k15_megatron.models.qwen2_vl import sequence_mrope_positions

            pixels = images[b] if images is not None else None
            sequence["position_ids"] = sequence_mrope_positions(
                sequence["input_ids"], pixels["image_grid_thw"] if pixels else None, vision_arch=vision)
            sequence.update(pixels or {})
        out.append(sequence)
    return out


def packed_micro_batches(batch: RolloutBatch, reference: torch.Tensor, *, multiple: int,
                         max_tokens: int | None, max_groups: int,
                         count_for: Callable[[int], int] | None = None, images: list | None = None,
                         vision=None) -> list[dict]:
    """The packed micro-batches (:func:`k15_megatron.train.packed.pack_sequences`) of one
    optimizer step on this rank, on the host (the schedule moves each to the device and cuts it
    per CP rank).

    Each sample is one sequence of its real length (:func:`response_sequences`), padded to
    ``multiple`` tokens (:func:`k15_megatron.train.schedule.packing_multiple`). Whole groups
    fill micro-batches in order up to ``max_tokens`` padded tokens (None: no token budget) and
    at most ``max_groups`` groups (:func:`k15_megatron.train.packed.token_budget_groups`; a
    group above the budget runs alone). ``count_for`` (e.g. ``functools.partial(
    k15_megatron.train.schedule.micro_batch_count, model)``, a collective) turns this rank's count
    into the count to run, reached by splitting micro-batches at group boundaries
    (:func:`k15_megatron.train.packed.split_to_count`). Per micro-batch of n samples: the packed per-token
    [1, T] fields ``input_ids``, ``position_ids``, ``sequence_ids``, ``targets``,
    ``loss_mask``, ``behaviour``, ``reference``, the ``cu_seqlens`` metadata, and ``rewards``
    [n], ``loss_tokens`` [n] (each response's loss-mask count: the WHOLE length that
    ``rl.normalize=length`` divides by on every CP rank), plus ``step_samples`` (the B samples
    of the step) and ``num_micro_batches`` (M) for the loss's normalisation.

    A vision-language model (``vision``, its VisionArch; ``images``: one entry per sample, None
    or the sample's image inputs): each sequence carries its M-RoPE positions and images
    (:func:`response_sequences`), so the micro-batch also holds ``position_ids`` [3, 1, T] and,
    when any of its samples has images, ``pixel_values`` / ``image_grid_thw`` in sequence order.
    """
    k = batch.group_size
    sequences = response_sequences(batch, reference, images=images, vision=vision)
    group_tokens = [sum(padded_length(int(s["input_ids"].numel()), multiple) for s in sequences[g * k:(g + 1) * k])
                    for g in range(batch.num_groups)]
    cuts = token_budget_groups(group_tokens, max_tokens=max_tokens or sum(group_tokens), max_items=max_groups)
    if count_for is not None:
        cuts = split_to_count(cuts, group_tokens, count_for(len(cuts)))
    out = []
    for groups in cuts:
        rows = [g * k + j for g in groups for j in range(k)]
        mb = pack_sequences([sequences[r] for r in rows], multiple=multiple)
        mb.update(rewards=batch.rewards[rows].float(),
                  loss_tokens=torch.stack([sequences[r]["loss_mask"].sum() for r in rows]).float(),
                  step_samples=batch.num_samples, num_micro_batches=len(cuts))
        out.append(mb)
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


def _sum_over_context_parallel(partial: torch.Tensor, cp_group) -> torch.Tensor:
    """The sum of ``partial`` over the CP group, forward all-reduce, backward identity (each
    rank's partial sums receive the gradient of the whole sum); no-op without a group."""
    if cp_group is None:
        return partial
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(partial.contiguous(), group=cp_group)


def _sequence_is_weights(log_ratio: torch.Tensor, clip: float) -> torch.Tensor:
    """[n] sequence-level truncated IS weights min(exp(l), C) of the whole-response log-ratios
    ``log_ratio`` [n] (reference - behaviour summed over every token of the response)."""
    total = log_ratio.detach().unsqueeze(1)  # [n, 1]: one "token" carrying the whole sum
    return truncated_is_weights(torch.zeros_like(total), total, torch.ones_like(total, dtype=torch.bool),
                                clip=clip, level="sequence")


def mirror_descent_loss_fn(rl_cfg, *, token_logprobs, log_ratios: _LogRatioStats | None = None, cp_group=None):
    """The loss function (for :func:`k15_megatron.train.schedule.forward_backward`) of one packed
    micro-batch of :func:`packed_micro_batches`, as this CP rank holds it (its tokens of every
    sequence): ``token_logprobs(output, targets)`` -> [1, T_local] log-probs -> this rank's
    share of each sequence log-prob under the loss mask
    (:func:`k15_megatron.rl.loss.packed_sequence_logprobs`, ``rl.normalize=length`` by the whole
    response length) -> summed over ``cp_group`` (with autograd) -> mirror-descent loss summed
    over the micro-batch's n samples. ``update_policy`` passes the chunked hidden-state head
    (:meth:`OutputHead.token_logprobs`); the memory benchmark also passes a plain
    full-vocabulary one. ``log_ratios`` collects log pi_theta - log pi_i per sample.

    Truncated IS (``rl.logprob_check``): token weights are local to each token; sequence weights
    use the log-ratio summed over the whole response (all-reduced over ``cp_group``).

    Normalisation. Megatron's schedule divides each micro-batch's returned loss by the count
    returned with it and by the number of micro-batches M (``calculate_per_token_loss`` off),
    and DDP averages gradients over the DP x CP ranks. Micro-batches hold different numbers of
    samples, so a mean of per-micro-batch means would weigh the samples of a small micro-batch
    more. With S = the micro-batch's loss sum (the same on every CP rank after the all-reduce)
    and B = the samples of the whole step on this DP rank, the loss returns (CP * M * S, B):

    * over the micro-batches of a DP rank d and its CP ranks c: the sequence sums are
      all-reduced with an identity backward, so CP rank c back-propagates dS/d(seq_lp) into its
      own tokens only and sum_c g_c = grad S, the CP=1 gradient of S (attention's K/V exchange
      carries the cross-rank terms). Each rank's accumulated gradient is
      sum_mb (CP * M / (B * M)) g_c = (CP / B) sum_mb g_c;
    * DDP averages over the DP*CP ranks: (1 / (DP * CP)) sum_d sum_c (CP / B) sum_mb g_{d,c}
      = (1 / DP) sum_d (1 / B) grad(sum of rank d's S) = the gradient of the mean loss over
      all DP * B samples of the step, whatever the split into micro-batches and whatever CP.

    The metrics keep the plain S and the micro-batch's sample count n."""
    cp_size = cp_group.size() if cp_group is not None else 1

    def loss(mb: dict, output: torch.Tensor):
        n, step_samples, num_micro_batches = mb["num_sequences"], mb["step_samples"], mb["num_micro_batches"]
        token_lp = token_logprobs(output, mb["targets"])
        mask = mb["loss_mask"]
        sequence_sum = functools.partial(packed_sequence_logprobs, response_mask=mask,
                                         sequence_ids=mb["sequence_ids"], num_sequences=n)
        check = rl_cfg.logprob_check
        weights = None
        if check.tis_enabled and check.tis_level == "token":
            weights = truncated_is_weights(mb["behaviour"], mb["reference"], mask, clip=check.tis_clip)
        normalised = functools.partial(sequence_sum, normalize=rl_cfg.normalize, constant=rl_cfg.normalize_constant,
                                       lengths=mb["loss_tokens"])
        seq_lp = normalised(token_lp, token_weights=weights)
        ref_lp = normalised(mb["reference"]).to(seq_lp.dtype)
        seq_lp, ref_lp = _sum_over_context_parallel(torch.stack([seq_lp, ref_lp]), cp_group)
        sample_weights = None
        if check.tis_enabled and check.tis_level == "sequence":
            log_ratio = sequence_sum(mb["reference"].double() - mb["behaviour"].double())
            sample_weights = _sequence_is_weights(_sum_over_context_parallel(log_ratio, cp_group), check.tis_clip)
        loss_sum = mirror_descent_loss(seq_lp, ref_lp, mb["rewards"], rl_cfg.group_size, rl_cfg.tau,
                                       rl_cfg.log_z, sample_weights=sample_weights, reduction="sum")
        if log_ratios is not None:
            log_ratios.add(seq_lp - ref_lp)
        num = torch.tensor(n, dtype=torch.int, device=loss_sum.device)
        step = torch.tensor(step_samples, dtype=torch.int, device=loss_sum.device)
        # Megatron divides the returned loss in place: the metric is a separate tensor.
        return loss_sum * (cp_size * num_micro_batches), step, {"loss_sum": loss_sum.detach().clone(),
                                                                 "num_tokens": num}
    return loss


def _check_batch(batch: RolloutBatch, rl_cfg) -> None:
    if batch.rewards is None:
        raise ValueError("update_policy needs a batch with rewards")
    if batch.group_size != rl_cfg.group_size:
        raise ValueError(f"batch group size {batch.group_size} != rl.group_size {rl_cfg.group_size}")
    attention = batch.attention_mask
    gap = attention[:, 1:] & ~attention[:, :-1]  # a real token after padding
    if bool(gap.any()) or bool((batch.loss_mask & ~attention).any()):
        raise ValueError("RolloutBatch rows must be prompt + response tokens then padding: attention_mask "
                         "has a gap, or loss_mask marks a padding position")


def _mismatch_metrics(behaviour: torch.Tensor, recomputed: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Behaviour vs recomputed log-prob drift over every data-parallel rank's tokens (collective)."""
    from megatron.core import parallel_state as ps

    stats = logprob_mismatch_stats(behaviour, recomputed, mask)
    if ps.get_data_parallel_world_size() > 1:
        stats = reduce_mismatch_stats(stats, group=ps.get_data_parallel_group())
    return {f"logprob/{k}": v for k, v in finalize_mismatch_metrics(stats).items()}


def _context_parallel_group():
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None


def _row_images(model_chunks, batch: RolloutBatch, images: Callable[[int], dict | None] | None):
    """(VisionArch or None, one entry per row of ``batch``: ``images(prompt id)`` or None) for
    the model of ``model_chunks``; (None, None) for a text model.

    Raises:
        ValueError: a row with images for a text model.
    """
    vision = getattr(unwrap_model(model_chunks[0]), "vision_arch", None)
    ids = batch.prompt_ids.tolist()
    by_prompt = {p: images(int(p)) for p in set(ids)} if images is not None else {}  # once per group
    rows = [by_prompt.get(p) for p in ids]
    if vision is None:
        if any(r is not None for r in rows):
            raise ValueError("update_policy got image prompts for a model without a vision tower")
        return None, None
    return vision, rows


def update_policy(trainer, batch: RolloutBatch, rl_cfg, *, micro_batch_tokens: int | None = None,
                  images: Callable[[int], dict | None] | None = None) -> dict:
    """Train on ``batch`` (see the module docstring); returns metrics, global over data-parallel
    ranks and equal on all ranks (collective).

    ``images``: prompt id -> the prompt's image inputs for the model (``{"pixel_values":
    [patches, values], "image_grid_thw": [I, 3]}``, None for a text prompt; e.g.
    :meth:`k15_megatron.data.prompt_set.PromptSet.pixels_of`). With a vision-language model
    (Qwen2-VL / Qwen2.5-VL) every row runs with its prompt's images and its own M-RoPE
    positions: the recompute as padded micro-batches
    (:func:`k15_megatron.train.logprobs.padded_image_micro_batches`), the update as packed ones
    (:func:`packed_micro_batches`), both from the same image inputs; the loss is unchanged.

    ``micro_batch_tokens``: the token budget of a packed micro-batch (padded tokens of the whole
    micro-batch, before the CP split; None: only ``rl.groups_per_micro_batch`` bounds it).
    Besides the loss, drift and log-ratio metrics: ``train/packed_tokens`` (tokens the training
    steps ran, padding to the CP/SP multiple included, summed over steps and data-parallel
    ranks) and ``train/micro_batches_per_update`` (their mean per step and rank); for a
    mixture-of-experts model the routing metrics of every step's training forwards
    (:class:`k15_megatron.train.moe_metrics.RoutingMetrics`: ``moe/aux_loss``,
    ``moe/load_imbalance_max``, ``moe/router_entropy``, per layer ``moe/layer_{i}/...``).

    Raises:
        ValueError: the batch has no rewards, a group size other than ``rl.group_size``, rows
            that are not prompt + response then padding, or its groups do not split evenly over
            the data-parallel ranks and ``rl.updates_per_iteration`` mini-batches (every rank
            must run the same number of equal steps; ``k15 rl`` pops a multiple of DP x updates);
            image inputs for a text model.
    """
    _check_batch(batch, rl_cfg)
    layout = trainer.layout
    groups, updates = batch.num_groups // layout.dp_size, rl_cfg.updates_per_iteration
    if batch.num_groups % layout.dp_size or groups % updates:
        raise ValueError(f"{batch.num_groups} groups cannot be split over {layout.dp_size} data-parallel ranks "
                         f"and rl.updates_per_iteration={updates} equal mini-batches")
    reset_bytes = reset_optimizer_state(trainer.optimizer) if rl_cfg.reset_optimizer else 0
    mine = batch.shard_groups(layout.dp_rank, layout.dp_size)
    vision, row_images = _row_images(trainer.chunks, mine, images)
    device = compute_device()
    recomputed = sequence_token_logprobs(trainer.chunks, mine.input_ids, vocab_size=trainer.arch.vocab_size,
                                         lengths=mine.attention_mask.sum(dim=1),
                                         micro_batch_size=rl_cfg.groups_per_micro_batch * mine.group_size,
                                         micro_batch_tokens=micro_batch_tokens, chunk_size=rl_cfg.logprob_chunk_tokens,
                                         images=row_images)
    behaviour = mine.behaviour_logprobs[:, 1:].to(device)
    metrics = _mismatch_metrics(behaviour, recomputed, mine.loss_mask[:, 1:].to(device))
    reference = recomputed if rl_cfg.reference == "recompute" else behaviour

    log_ratios = _LogRatioStats()
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # micro-batches, packed tokens
    per_update, multiple = groups // updates, packing_multiple(trainer.chunks)
    losses, grad_norms = [], []
    with hidden_state_output(trainer.chunks) as head, RoutingMetrics(trainer.chunks) as routing:
        token_lp = functools.partial(head.token_logprobs, vocab_size=trainer.arch.vocab_size,
                                     chunk_size=rl_cfg.logprob_chunk_tokens)
        loss_fn = mirror_descent_loss_fn(rl_cfg, token_logprobs=token_lp, log_ratios=log_ratios,
                                         cp_group=_context_parallel_group())
        for u in range(updates):
            part = mine.select_groups(torch.arange(u * per_update, (u + 1) * per_update))
            rows = slice(u * per_update * mine.group_size, (u + 1) * per_update * mine.group_size)
            micro = packed_micro_batches(part, reference[rows], multiple=multiple, max_tokens=micro_batch_tokens,
                                         max_groups=rl_cfg.groups_per_micro_batch,
                                         count_for=functools.partial(micro_batch_count, trainer.chunks),
                                         images=row_images[rows] if row_images is not None else None, vision=vision)
            counts += torch.tensor([len(micro), sum(int(mb["cu_seqlens_padded"][-1]) for mb in micro)],
                                   dtype=torch.float64, device=device)
            step = train_step(trainer.chunks, trainer.optimizer, trainer.scheduler, micro, loss_fn=loss_fn)
            losses.append(step["loss"])
            grad_norms.append(step["grad_norm"])
    counts = global_step_metrics(counts)
    metrics.update(log_ratios.global_metrics())
    metrics.update(routing.global_metrics())
    metrics.update({"train/loss": sum(losses) / len(losses), "train/grad_norm": max(grad_norms),
                    "train/lr": step["lr"], "train/updates": float(updates),
                    "train/optimizer_reset_bytes": float(reset_bytes),
                    "train/num_samples": float(mine.num_samples * layout.dp_size),
                    "train/micro_batches_per_update": float(counts[0]) / (updates * layout.dp_size),
                    "train/packed_tokens": float(counts[1])})
    return metrics
