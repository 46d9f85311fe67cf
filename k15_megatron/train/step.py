"""One optimizer step over a list of micro-batches, and the language-model loss it usually uses.

``train_step`` zeroes gradients, runs :func:`k15_megatron.train.schedule.forward_backward`,
steps the optimizer and the LR schedule, and returns the averaged metrics on every rank
(broadcast from the last pipeline stage, so logging code need not know the layout).
"""

from __future__ import annotations

import torch

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


def _broadcast_from_last_stage(values: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return values
    last = ps.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(values, src=last, group=ps.get_pipeline_model_parallel_group())
    return values


def train_step(model_chunks, optimizer, scheduler, micro_batches, loss_fn=masked_token_loss) -> dict:
    """One optimizer step; returns {"loss", "grad_norm", "lr", "skipped"} identical on all ranks."""
    for chunk in model_chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = forward_backward(model_chunks, micro_batches, loss_fn)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful and scheduler is not None:
        scheduler.step(increment=1)
    sums = torch.zeros(2, dtype=torch.float64)
    for out in outputs:
        sums[0] += float(out["loss_sum"])
        sums[1] += float(out["num_tokens"])
    sums = _broadcast_from_last_stage(sums)
    return {
        "loss": (sums[0] / sums[1].clamp(min=1)).item(),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": optimizer.param_groups[0]["lr"],
        "skipped": not update_successful,
    }
