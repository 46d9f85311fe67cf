"""One optimizer step over a list of micro-batches, and the language-model loss it usually uses.

``train_step`` zeroes gradients, counts the step's loss tokens (:func:`with_step_counts`), runs
:func:`k15_megatron.train.schedule.forward_backward`, steps the optimizer and the LR schedule,
and returns the averaged metrics on every rank (reduced over data-parallel and context-parallel
ranks and broadcast from the last pipeline stage, so logging code need not know the layout).

Normalisation (:func:`masked_token_loss`): the gradient of one step is that of the token mean
of the loss over EVERY loss token of the step, all micro-batches of all data-parallel ranks,
    grad = sum over the step's loss tokens of grad(loss_t) / N_step,
whatever the micro-batches (packed or padded, how many, how full), the data-parallel size or
the context-parallel split. Megatron's schedule divides each micro-batch's returned loss by the
count returned with it and by the number of micro-batches M (``calculate_per_token_loss`` off),
and its DDP averages gradients over the DP x CP ranks, so a micro-batch returns
(M x DP x CP x this rank's loss sum, N_step): the factors cancel and every rank's tokens count
once. N_step is counted on the host from the whole (uncut) micro-batches, which every CP rank
holds, and all-reduced over the data-parallel group before the forward passes.
"""

from __future__ import annotations

import torch

from k15_megatron.parallel.device import compute_device
from k15_megatron.train.packed import is_packed
from k15_megatron.train.schedule import forward_backward

STEP_TOKENS_KEY = "step_loss_tokens"
"""Micro-batch entry set by :func:`with_step_counts`: the step's loss tokens over all DP ranks."""
STEP_MICRO_BATCHES_KEY = "step_micro_batches"
"""Micro-batch entry set by :func:`with_step_counts`: this rank's micro-batches in the step."""


def loss_token_mask(micro_batch: dict, like: torch.Tensor) -> torch.Tensor:
    """Which tokens carry loss, shaped like ``like`` (the per-token loss, or ``input_ids``):
    ``loss_mask`` when the micro-batch has one, else every real token (packed: not padding,
    ``sequence_ids >= 0``; padded: every position)."""
    mask = micro_batch.get("loss_mask")
    if mask is not None:
        return mask
    if is_packed(micro_batch):
        return micro_batch["sequence_ids"] >= 0
    return torch.ones(like.shape, dtype=torch.bool, device=like.device)


def with_step_counts(micro_batches) -> list[dict]:
    """Copies of ``micro_batches`` carrying the step's normalisation (collective over the
    data-parallel group, on every rank): ``step_loss_tokens`` (int, the loss tokens of every
    data-parallel rank's micro-batches, :func:`loss_token_mask`, counted before any CP split)
    and ``step_micro_batches`` (int, M on this rank)."""
    from megatron.core import parallel_state as ps

    count = sum(int(loss_token_mask(mb, mb["input_ids"]).sum()) for mb in micro_batches)
    total = torch.tensor([count], dtype=torch.float64, device=compute_device())
    if ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    extra = {STEP_TOKENS_KEY: int(total.item()), STEP_MICRO_BATCHES_KEY: len(micro_batches)}
    return [{**mb, **extra} for mb in micro_batches]


def masked_token_loss(micro_batch: dict, token_loss: torch.Tensor):
    """The loss function of language-model training: per-token losses ([B, S] or packed
    [1, T], this CP rank's share) under :func:`loss_token_mask`, normalised by the step's loss
    tokens as the module docstring derives. Returns (M x DP x CP x loss sum, N_step as an int
    tensor, metrics with this rank's plain ``loss_sum`` and ``num_tokens``).

    Raises:
        ValueError: the micro-batch lacks the step counts of :func:`with_step_counts`
            (``train_step`` adds them).
    """
    from megatron.core import parallel_state as ps

    if STEP_TOKENS_KEY not in micro_batch or STEP_MICRO_BATCHES_KEY not in micro_batch:
        raise ValueError(f"masked_token_loss normalises by the step's loss tokens: the micro-batch needs "
                         f"{STEP_TOKENS_KEY!r} and {STEP_MICRO_BATCHES_KEY!r} (train_step adds them, "
                         "see with_step_counts)")
    mask = loss_token_mask(micro_batch, token_loss).to(token_loss.dtype)
    loss_sum = (token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    scale = micro_batch[STEP_MICRO_BATCHES_KEY] * ps.get_data_parallel_world_size(with_context_parallel=True)
    step_tokens = torch.tensor(micro_batch[STEP_TOKENS_KEY], dtype=torch.int, device=token_loss.device)
    # clone: Megatron divides the returned loss in place.
    return loss_sum * scale, step_tokens, {"loss_sum": loss_sum.detach().clone(), "num_tokens": num_tokens.clone()}


def global_step_metrics(sums: torch.Tensor, maxima: torch.Tensor | None = None, *, context_parallel: bool = False):
    """This rank's metric sums (and maxima) -> their values over all data-parallel ranks, equal
    on every rank (collective): all-reduced (SUM / MAX) over the data-parallel group (with
    ``context_parallel``: the data-parallel x context-parallel group, for sums of per-token
    values each CP rank holds a share of), then broadcast from the last pipeline stage (the only
    one that ran the loss). In place; the tensors must live on the compute device (NCCL takes
    no host tensors)."""
    from megatron.core import parallel_state as ps

    tensors = [(sums, torch.distributed.ReduceOp.SUM)] + ([(maxima, torch.distributed.ReduceOp.MAX)]
                                                          if maxima is not None else [])
    for values, op in tensors:
        if ps.get_data_parallel_world_size(with_context_parallel=context_parallel) > 1:
            torch.distributed.all_reduce(values, op=op,
                                         group=ps.get_data_parallel_group(with_context_parallel=context_parallel))
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(values, src=ps.get_pipeline_model_parallel_last_rank(),
                                        group=ps.get_pipeline_model_parallel_group())
    return sums if maxima is None else (sums, maxima)


def train_step(model_chunks, optimizer, scheduler, micro_batches, loss_fn=masked_token_loss) -> dict:
    """One optimizer step; returns {"loss", "grad_norm", "lr", "skipped"} identical on all ranks
    ("loss": the sum of the micro-batches' ``loss_sum`` metrics over their ``num_tokens``, over
    every data-parallel and context-parallel rank: the step's token mean for
    :func:`masked_token_loss`). The micro-batches reach ``loss_fn`` with the step counts of
    :func:`with_step_counts` (collective over the data-parallel group)."""
    micro_batches = with_step_counts(micro_batches)
    for chunk in model_chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = forward_backward(model_chunks, micro_batches, loss_fn)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful and scheduler is not None:
        scheduler.step(increment=1)
    sums = torch.zeros(2, dtype=torch.float64, device=compute_device())
    for out in outputs:
        sums[0] += out["loss_sum"].double().to(sums.device)
        sums[1] += out["num_tokens"].double().to(sums.device)
    sums = global_step_metrics(sums, context_parallel=True)  # over every DP x CP rank's micro-batches
    return {
        "loss": (sums[0] / sums[1].clamp(min=1)).item(),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": optimizer.param_groups[0]["lr"],
        "skipped": not update_successful,
    }
