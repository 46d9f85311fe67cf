"""DPO on Megatron: the reference log-probs, the packed pair micro-batches and their loss.

* :func:`reference_logprobs`: the summed response log-probs of every pair's chosen and rejected
  sequence under the model as it is now (the starting weights: ``k15 dpo`` calls it before its
  first step), forward only (:func:`k15_megatron.train.logprobs.sequence_token_logprobs`), each
  data-parallel rank computing its share of the pairs, all-gathered.
* :func:`dpo_micro_batches`: packed (THD) micro-batches of whole pairs, a pair's chosen and
  rejected sequence side by side (sequences 2i and 2i+1), with per-token ``targets`` and
  ``loss_mask`` (1 where the next token is a response token) and the pairs' reference values.
* :func:`dpo_loss_fn`: the loss of one such micro-batch: token log-probs from the last stage's
  hidden states through the chunked output head (:class:`~k15_megatron.train.logprobs.OutputHead`,
  never full logits), summed per sequence over the response tokens
  (:func:`k15_megatron.rl.loss.packed_sequence_logprobs`), summed over the context-parallel
  group (forward all-reduce, backward identity), then :func:`k15_megatron.rl.dpo.dpo_loss`.

Normalisation (as :func:`k15_megatron.train.step.masked_token_loss`, with pairs for tokens):
the step's gradient is that of the MEAN DPO loss over every pair of the step, all micro-batches
of all data-parallel ranks. Megatron's schedule divides each micro-batch's returned loss by the
count returned with it and by the number of micro-batches M, and DDP averages the gradients over
the DP x CP ranks; a micro-batch returns (CP x M x S, B) with S its pairs' summed loss and B the
pairs of the step on this data-parallel rank (every rank holds the same number), so
    grad = (1 / (DP x CP)) sum_{d, c} (CP / B) sum_mb grad_c S = (1 / (DP x B)) sum_pairs grad loss.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from k15_megatron.data.pairs import Pair
from k15_megatron.parallel.device import compute_device
from k15_megatron.rl.dpo import chosen_nll, dpo_loss, dpo_metrics
from k15_megatron.rl.loss import packed_sequence_logprobs
from k15_megatron.train.logprobs import hidden_state_output, sequence_token_logprobs
from k15_megatron.train.packed import next_token, pack_sequences
from k15_megatron.train.step import STEP_MICRO_BATCHES_KEY, global_step_metrics, train_step

REFERENCE_BLOCK_PAIRS = 64
"""Pairs per call of the reference pass on one data-parallel rank (bounds its [2 x pairs, T]
host and result tensors)."""


def pair_sequences(pair: Pair) -> list[dict]:
    """The chosen and the rejected sequence of ``pair``: ``input_ids`` [L] (prompt + response),
    ``targets`` [L] (the next token; 0 at the end) and ``loss_mask`` [L] bool (the next token is
    a response token)."""
    out = []
    for response in (pair.chosen, pair.rejected):
        ids = torch.tensor(pair.prompt + response, dtype=torch.int64)
        is_response = torch.zeros(len(ids), dtype=torch.bool)
        is_response[len(pair.prompt):] = True
        out.append({"input_ids": ids, "targets": next_token(ids), "loss_mask": next_token(is_response)})
    return out


def _sequence_sums(pairs: Sequence[Pair], token_lp: torch.Tensor) -> torch.Tensor:
    """[2n] float64 response sums (chosen, rejected alternating) of ``token_lp`` [2n, T-1]."""
    sums = []
    for row, (pair, response) in enumerate((p, r) for p in pairs for r in (p.chosen, p.rejected)):
        start = len(pair.prompt) - 1  # label position t scores token t + 1
        sums.append(token_lp[row, start:start + len(response)].double().sum())
    return torch.stack(sums)


def reference_logprobs(model_chunks, pairs: Sequence[Pair], *, vocab_size: int, chunk_size: int,
                       micro_batch_size: int) -> torch.Tensor:
    """[P, 2] float64 on the host, equal on every rank (collective over every group): the summed
    response log-probs (chosen, rejected) of each of the P ``pairs`` under the model now, forward
    only. Data-parallel rank d scores pairs d x S ... (d + 1) x S - 1 (S = ceil(P / DP); the last
    shares padded with pair 0 so every rank runs the same passes), in blocks of
    :data:`REFERENCE_BLOCK_PAIRS` pairs of ``micro_batch_size`` sequences per micro-batch."""
    from megatron.core import parallel_state as ps

    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = -(-len(pairs) // dp_size)
    mine = [pairs[i] if i < len(pairs) else pairs[0] for i in range(dp_rank * share, (dp_rank + 1) * share)]
    values = []
    for start in range(0, share, REFERENCE_BLOCK_PAIRS):
        block = mine[start:start + REFERENCE_BLOCK_PAIRS]
        rows = [seq["input_ids"] for pair in block for seq in pair_sequences(pair)]
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        token_lp = sequence_token_logprobs(model_chunks, ids, vocab_size=vocab_size, lengths=lengths,
                                           micro_batch_size=micro_batch_size, chunk_size=chunk_size)
        values.append(_sequence_sums(block, token_lp.cpu()))
    local = torch.cat(values).view(-1, 2).to(compute_device())
    if dp_size > 1:
        parts = [torch.empty_like(local) for _ in range(dp_size)]
        torch.distributed.all_gather(parts, local, group=ps.get_data_parallel_group())
        local = torch.cat(parts)
    return local[:len(pairs)].cpu()


def dpo_micro_batches(pairs: Sequence[Pair], reference: torch.Tensor, *, pairs_per_micro_batch: int,
                      multiple: int) -> list[dict]:
    """Packed micro-batches (:func:`k15_megatron.train.packed.pack_sequences`) of
    ``pairs_per_micro_batch`` consecutive pairs each (the last may hold fewer): the fields of
    :func:`pair_sequences`, each sequence padded to ``multiple`` tokens, plus ``reference``
    [2n] float64 (the pairs' rows of ``reference`` [len(pairs), 2], chosen and rejected
    alternating, as the sequences), ``chosen_tokens`` [n] float64 (each pair's chosen response
    tokens) and ``step_pairs`` (len(pairs): this rank's pairs in the step)."""
    assert reference.shape == (len(pairs), 2), (tuple(reference.shape), len(pairs))
    batches = []
    for start in range(0, len(pairs), pairs_per_micro_batch):
        part = pairs[start:start + pairs_per_micro_batch]
        sequences = [seq for pair in part for seq in pair_sequences(pair)]
        batch = pack_sequences(sequences, multiple=multiple)
        batch.update(reference=reference[start:start + len(part)].reshape(-1).double(), step_pairs=len(pairs),
                     chosen_tokens=torch.tensor([len(pair.chosen) for pair in part], dtype=torch.float64))
        batches.append(batch)
    return batches


class _RewardSums:
    """[pairs, sum r_w, sum r_l, sum (r_w - r_l), pairs with r_w > r_l, sum of the chosen NLL per
    token] of this rank's micro-batches."""

    KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "train/chosen_nll")

    def __init__(self):
        self.sums = torch.zeros(1 + len(self.KEYS), dtype=torch.float64, device=compute_device())

    def add(self, metrics: dict, pairs: int) -> None:
        self.sums += torch.tensor([pairs] + [metrics[k] * pairs for k in self.KEYS], dtype=torch.float64,
                                  device=self.sums.device)

    def global_metrics(self) -> dict:
        """Means over every data-parallel rank's pairs (collective)."""
        sums = global_step_metrics(self.sums.clone())
        return {key: float(sums[1 + i] / sums[0].clamp(min=1)) for i, key in enumerate(self.KEYS)}


def _sum_over_context_parallel(partial: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_context_parallel_world_size() == 1:
        return partial
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(partial.contiguous(), group=ps.get_context_parallel_group())


def dpo_loss_fn(*, beta: float, token_logprobs, rewards: _RewardSums | None = None, sft_loss_weight: float = 0.0):
    """The loss function (:func:`k15_megatron.train.schedule.forward_backward`) of one micro-batch
    of :func:`dpo_micro_batches` as this CP rank holds it: ``token_logprobs(output, targets)`` ->
    [1, T_local] -> per-sequence response sums -> summed over the CP group -> (``dpo_loss`` +
    ``sft_loss_weight`` x :func:`~k15_megatron.rl.dpo.chosen_nll`) x n pairs, returned as the
    module docstring's normalisation needs. ``rewards`` collects the logged implicit rewards and
    the chosen NLL."""
    from megatron.core import parallel_state as ps

    def loss(mb: dict, output: torch.Tensor):
        n = mb["num_sequences"]
        token_lp = token_logprobs(output, mb["targets"])
        sequence_lp = _sum_over_context_parallel(packed_sequence_logprobs(
            token_lp, mb["loss_mask"], mb["sequence_ids"], num_sequences=n))
        reference = mb["reference"].to(sequence_lp.dtype)
        args = (sequence_lp[0::2], sequence_lp[1::2], reference[0::2], reference[1::2])
        pairs = n // 2
        nll = chosen_nll(args[0], mb["chosen_tokens"].to(sequence_lp.device))
        loss_sum = (dpo_loss(*args, beta=beta) + sft_loss_weight * nll) * pairs
        if rewards is not None:
            rewards.add({**dpo_metrics(*args, beta=beta), "train/chosen_nll": float(nll.detach())}, pairs)
        scale = ps.get_context_parallel_world_size() * mb[STEP_MICRO_BATCHES_KEY]
        step_pairs = torch.tensor(mb["step_pairs"], dtype=torch.int, device=loss_sum.device)
        # Megatron divides the returned loss in place: the metric is a separate tensor.
        return loss_sum * scale, step_pairs, {"loss_sum": loss_sum.detach().clone(),
                                              "num_tokens": torch.tensor(pairs, dtype=torch.int,
                                                                         device=loss_sum.device)}
    return loss


def dpo_step(trainer, pairs: Sequence[Pair], reference: torch.Tensor, *, beta: float, chunk_size: int,
             pairs_per_micro_batch: int, sft_loss_weight: float = 0.0) -> dict:
    """One optimizer step on this data-parallel rank's ``pairs`` (every rank the same number)
    with their ``reference`` [len(pairs), 2]; returns ``train/loss`` (the mean loss over the
    step's pairs, all ranks: DPO + ``sft_loss_weight`` x chosen NLL per token),
    ``train/grad_norm``, ``train/lr``, ``train/chosen_nll`` and the ``rewards/*`` means of
    :func:`k15_megatron.rl.dpo.dpo_metrics` over all the step's pairs, equal on every rank."""
    from k15_megatron.train.schedule import packing_multiple

    micro = dpo_micro_batches(pairs, reference, pairs_per_micro_batch=pairs_per_micro_batch,
                              multiple=packing_multiple(trainer.chunks))
    rewards = _RewardSums()
    with hidden_state_output(trainer.chunks) as head:
        token_lp = functools.partial(head.token_logprobs, vocab_size=trainer.arch.vocab_size, chunk_size=chunk_size)
        step = train_step(trainer.chunks, trainer.optimizer, trainer.scheduler, micro,
                          loss_fn=dpo_loss_fn(beta=beta, token_logprobs=token_lp, rewards=rewards,
                                              sft_loss_weight=sft_loss_weight))
    return {"train/loss": step["loss"], "train/grad_norm": step["grad_norm"], "train/lr": step["lr"],
            **rewards.global_metrics()}
