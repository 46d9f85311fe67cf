"""One optimizer step over a list of micro-batches, and the language-model loss it usually uses.

``train_step`` zeroes gradients, runs :func:`k15_megatron.train.schedule.forward_backward`,
steps the optimizer and the LR schedule, and returns the averaged metrics on every rank
(reduced over data-parallel ranks and broadcast from the last pipeline stage, so logging code
need not know the layout).
"""

from __future__ import annotations

import torch

from k15_megatron.parallel.device import compute_device
from k15_megatron.train.schedule import forward_backward


def masked_token_loss(micro_batch: dict, token_loss: torch.Tensor):
    """Sum of per-token losses [B, S] under ``loss_mask`` (default: all ones), its token count and
    metrics; Megatron's schedule divides by the count to give the per-token mean."""
    mask = micro_batch.get("loss_mask")
    if mask is None:
        mask = torch.ones_like(token_loss)
    mask = mask.to(token_loss.dtype)
    loss_sum = (token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    # clone: Megatron divides the returned loss in place.
    return loss_sum, num_tokens, {"loss_sum": loss_sum.detach().clone(), "num_tokens": num_tokens.clone()}


def global_step_metrics(sums: torch.Tensor, maxima: torch.Tensor | None = None):
    """This rank's metric sums (and maxima) -> their values over all data-parallel ranks, equal
    on every rank (collective): all-reduced (SUM / MAX) over the data-parallel group, then
    broadcast from the last pipeline stage (the only one that ran the loss). In place; the
    tensors must live on the compute device (NCCL takes no host tensors)."""
    from megatron.core import parallel_state as ps

    tensors = [(sums, torch.distributed.ReduceOp.SUM)] + ([(maxima, torch.distributed.ReduceOp.MAX)]
                                                          if maxima is not None else [])
    for values, op in tensors:
        if ps.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(values, op=op, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(values, src=ps.get_pipeline_model_parallel_last_rank(),
                                        group=ps.get_pipeline_model_parallel_group())
    return sums if maxima is None else (sums, maxima)


def train_step(model_chunks, optimizer, scheduler, micro_batches, loss_fn=masked_token_loss) -> dict:
    """One optimizer step; returns {"loss", "grad_norm", "lr", "skipped"} identical on all ranks
    ("loss": the token-weighted mean over the micro-batches of every data-parallel rank)."""
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
    sums = global_step_metrics(sums)  # the loss over every data-parallel rank's micro-batches
    return {
        "loss": (sums[0] / sums[1].clamp(min=1)).item(),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": optimizer.param_groups[0]["lr"],
        "skipped": not update_successful,
    }
