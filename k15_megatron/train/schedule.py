"""Forward/backward over micro-batches through Megatron's pipeline schedules.

One function, :func:`forward_backward`, runs any (TP, PP) layout through
``megatron.core.pipeline_parallel.get_forward_backward_func()``; callers supply the micro-batches
and a loss function and never see pipeline stages. :func:`forward_logits` is the forward-only
special case that returns the vocabulary-parallel logits on the last stage.

Micro-batches may be built on the host: each is moved to the compute device
(:func:`k15_megatron.parallel.device.to_device`) right before Megatron's forward, one at a time,
so only the running micro-batch occupies device memory. Tensors the loss function creates must be
created on the device of the model output it receives.

A micro-batch is a dict with ``input_ids`` and ``position_ids`` [B, S] (long), optionally an
``attention_mask`` [B, 1, S, S] (bool, True = masked; default causal), plus whatever the loss
function reads (e.g. ``labels``, ``loss_mask``). The loss function receives
``(micro_batch, output)`` where output is the model's output on the last stage (per-token loss
[B, S] when ``labels`` are in the batch, else logits [B, S, V/TP]) and returns
``(loss_scalar, num_tokens, metrics_dict)``; Megatron divides the loss by ``num_tokens`` and the
number of micro-batches.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from k15_megatron.parallel.device import compute_device, to_device


def _as_list(model):
    return list(model) if isinstance(model, (list, tuple)) else [model]


def forward_backward(model, micro_batches: Sequence[dict], loss_fn: Callable, *,
                     forward_only: bool = False) -> list[dict]:
    """Run all ``micro_batches`` forward (and backward unless ``forward_only``).

    Returns the metrics dicts of every micro-batch on the last pipeline stage, [] elsewhere.
    Gradients accumulate into the parameters' ``main_grad`` (Megatron DDP) or ``grad``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    batches = list(micro_batches)
    seq_length = batches[0]["input_ids"].shape[1]
    micro_batch_size = batches[0]["input_ids"].shape[0]
    for i, mb in enumerate(batches):
        if tuple(mb["input_ids"].shape) != (micro_batch_size, seq_length):
            raise ValueError(
                f"micro-batch {i} has shape {tuple(mb['input_ids'].shape)}; pipeline schedules need "
                f"every micro-batch to be [{micro_batch_size}, {seq_length}] (pad them)"
            )
    iterator = iter(batches)

    def forward_step(data_iterator, chunk):
        # The one place micro-batches built on the host reach the device (a no-op for tensors
        # already there); the loss function sees the same, moved, micro-batch.
        mb = to_device(next(data_iterator))
        output = chunk(mb["input_ids"], mb["position_ids"], mb.get("attention_mask"), labels=mb.get("labels"))

        def loss_func(output_tensor):
            loss, num_tokens, metrics = loss_fn(mb, output_tensor)
            return loss, num_tokens, metrics

        return output, loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterator,
        model=_as_list(model),
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


@torch.no_grad()
def forward_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
    """Vocabulary-parallel logits [B, S, V_pad/TP] of one batch on the last stage, None elsewhere."""
    from megatron.core import parallel_state

    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=compute_device()).unsqueeze(0).expand_as(input_ids)
    batch = {"input_ids": input_ids, "position_ids": position_ids}

    def keep_logits(mb, logits):
        return logits.new_zeros(()), torch.tensor(1, dtype=torch.int, device=logits.device), {"logits": logits.detach()}

    for chunk in _as_list(model):
        chunk.eval()
    outputs = forward_backward(model, [batch], keep_logits, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return outputs[0]["logits"]
