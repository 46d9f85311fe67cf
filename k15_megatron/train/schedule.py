"""Forward/backward over micro-batches through Megatron's pipeline schedules.

One function, :func:`forward_backward`, runs any (TP, PP, CP) layout through
``megatron.core.pipeline_parallel.get_forward_backward_func()``; callers supply the micro-batches
and a loss function and never see pipeline stages or context-parallel ranks.
:func:`forward_logits` is the forward-only special case that returns the vocabulary-parallel
logits on the last stage.

Micro-batches may be built on the host: each is cut to this context-parallel rank's tokens
(on the host) and moved to the compute device (:func:`k15_megatron.parallel.device.to_device`)
right before Megatron's forward, one at a time, so only the running micro-batch's share
occupies device memory. Tensors the loss function creates must be created on the device of the
model output it receives. Every rank of a context-parallel group gets the same (whole)
micro-batches.

Two kinds of micro-batch, all of one kind in a call:

* packed (THD, :mod:`k15_megatron.train.packed`): sequences back to back, per-token tensors
  [1, T], ``cu_seqlens``/``cu_seqlens_padded``/``max_seqlen`` (a vision-language model's: also
  its sequences' images and M-RoPE ``position_ids`` [3, 1, T], see :func:`image_inputs`).
  The model runs with Megatron's ``PackedSeqParams(qkv_format="thd")`` (sequences never
  attend to each other, RoPE positions restart per sequence) and no attention mask. Under CP > 1 every [1, T] tensor is cut to this
  rank's tokens (:func:`k15_megatron.train.packed.cp_rank_share`).
* padded: ``input_ids`` and ``position_ids`` [B, S] (long), optionally an ``attention_mask``
  [B, 1, S, S] (bool, True = masked; default causal; CP = 1 only). Under CP > 1 each row is one
  sequence of S tokens, S a multiple of :func:`packing_multiple`: every [B, S] tensor is cut
  along dim 1 with the same index for each row (the rank's two chunks of the row, Megatron's
  ``get_batch_on_this_cp_rank`` layout), so the loss function sees [B, S/CP] fields.

Plus whatever the loss function reads (e.g. ``labels``, ``loss_mask``; a ``labels`` entry makes
Megatron return the per-token loss instead of logits). The loss function receives
``(micro_batch, output)``: this rank's share of the micro-batch and the model's output on the
last stage (per-token loss [B, S/CP] or [1, T/CP] when ``labels`` are in the batch, else logits
[B, S/CP, V/TP]; hidden states under :func:`k15_megatron.train.logprobs.hidden_state_output`),
and returns ``(loss_scalar, num_tokens, metrics_dict)``. Megatron divides the loss by
``num_tokens`` and the number of micro-batches, and its DDP averages the gradients over the
data-parallel x context-parallel ranks (each CP rank's gradient covers only its tokens): a loss
over this CP rank's tokens must be scaled by CP (and normalised by a count over the whole
sequence) for the update to be the same as without CP (:func:`k15_megatron.train.step.masked_token_loss`
does this).

Pipeline parallelism with micro-batches of different token counts (packed micro-batches, one
token budget each) needs ``TransformerConfig.variable_seq_lengths`` (the stages exchange each
activation's shape first); :func:`k15_megatron.models.gpt.transformer_config` sets it when
PP > 1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from k15_megatron.models.gpt import unwrap_model
from k15_megatron.parallel.context import cp_rank_token_index, sequence_multiple
from k15_megatron.parallel.device import compute_device, to_device
from k15_megatron.train.packed import cp_rank_share, is_packed


def _as_list(model):
    return list(model) if isinstance(model, (list, tuple)) else [model]


def packing_multiple(model) -> int:
    """The multiple every sequence must be padded to under this rank's layout (2*CP with
    context parallelism, times TP with sequence parallelism; see
    :func:`k15_megatron.parallel.context.sequence_multiple`), read from Megatron's parallel state
    and the model's config. Pass it to :func:`k15_megatron.train.packed.pack_sequences`."""
    from megatron.core import parallel_state as ps

    config = unwrap_model(_as_list(model)[0]).config
    return sequence_multiple(cp_size=ps.get_context_parallel_world_size(),
                             tp_size=ps.get_tensor_model_parallel_world_size(),
                             sequence_parallel=bool(config.sequence_parallel))


def padded_cp_share(micro_batch: dict, *, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's part of a padded micro-batch: every [B, S] tensor cut along dim 1 to the
    rank's two chunks of each row ([B, S/CP], Megatron's load-balanced order, the same index for
    every row); other entries passed through. ``cp_size=1`` returns the batch unchanged.

    Raises:
        ValueError: an ``attention_mask`` under CP > 1 (it cannot be cut per rank), or S not a
            multiple of 2*CP.
    """
    if cp_size == 1:
        return dict(micro_batch)
    if micro_batch.get("attention_mask") is not None:
        raise ValueError("a padded micro-batch with an attention_mask cannot be split over "
                         f"parallel.context={cp_size} ranks; pack the sequences instead "
                         "(k15_megatron.train.packed.pack_sequences)")
    shape = tuple(micro_batch["input_ids"].shape)
    index = cp_rank_token_index([shape[1]], cp_size=cp_size, cp_rank=cp_rank)
    out = {}
    for key, value in micro_batch.items():
        per_token = isinstance(value, torch.Tensor) and value.dim() == 2 and tuple(value.shape) == shape
        out[key] = value[:, index.to(value.device)] if per_token else value
    return out


def _packed_seq_params(micro_batch: dict):
    """Megatron's PackedSeqParams of a packed micro-batch already on the device."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = micro_batch["cu_seqlens"].to(torch.int32)
    cu_padded = micro_batch["cu_seqlens_padded"].to(torch.int32)
    max_seqlen = int(micro_batch["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                           cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def _check_shapes(batches: list[dict], *, model) -> tuple[int, int]:
    """(seq_length, micro_batch_size) for Megatron's schedule: the full (pre-CP) token count of
    the longest micro-batch (the schedule divides by CP itself) and the rows of one."""
    from megatron.core import parallel_state as ps

    packed = [is_packed(mb) for mb in batches]
    if any(packed) and not all(packed):
        raise ValueError("forward_backward got packed and padded micro-batches in one call; use one kind")
    shapes = [tuple(mb["input_ids"].shape) for mb in batches]
    multiple = packing_multiple(model)
    for i, (rows, length) in enumerate(shapes):
        if length % multiple:
            raise ValueError(f"micro-batch {i} has {length} tokens per row, not a multiple of {multiple} "
                             "(2 x parallel.context, x parallel.tensor under sequence parallelism); pad "
                             "each sequence to it (pack_sequences(multiple=packing_multiple(model)))")
    config = unwrap_model(_as_list(model)[0]).config
    if (ps.get_pipeline_model_parallel_world_size() > 1 and len(set(shapes)) > 1
            and not config.variable_seq_lengths):
        raise ValueError(f"micro-batch shapes {sorted(set(shapes))} differ; pipeline schedules need "
                         "TransformerConfig.variable_seq_lengths=True for that (or pad them to one shape)")
    return max(length for _, length in shapes), max(rows for rows, _ in shapes)


def _expert_parallel_group(model):
    """The expert-parallel group when ``model`` is a mixture of experts under EP > 1, else None."""
    from megatron.core import parallel_state as ps

    if not unwrap_model(_as_list(model)[0]).config.num_moe_experts or ps.get_expert_model_parallel_world_size() == 1:
        return None
    return ps.get_expert_model_parallel_group()


def _count_range(model, count: int) -> tuple[int, int]:
    """(fewest, most) of ``count`` over the expert-parallel group (one all-reduce)."""
    group = _expert_parallel_group(model)
    if group is None:
        return count, count
    counts = torch.tensor([count, -count], dtype=torch.int64, device=compute_device())
    torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX, group=group)
    return -int(counts[1]), int(counts[0])


def micro_batch_count(model, count: int) -> int:
    """How many micro-batches this rank must run when its own data makes ``count``: the largest
    ``count`` over its expert-parallel group for a mixture-of-experts model under EP > 1 (every
    MoE layer's forward is an all-to-all or all-gather over that group, so each rank must run the
    same number of forward passes; data-parallel ranks' different samples can cut into different
    counts under a token budget), else ``count``. Collective over the EP group; callers split
    their micro-batches to it (:func:`k15_megatron.train.packed.split_to_count`)."""
    return _count_range(model, count)[1]


def _check_expert_parallel_counts(model, count: int) -> None:
    """Raise instead of hanging when the EP ranks were given different micro-batch counts."""
    fewest, most = _count_range(model, count)
    if most != fewest:
        raise ValueError(f"expert-parallel ranks would run between {fewest} and {most} micro-batches in one call "
                         f"(this rank {count}); every MoE layer's token exchange needs the same number on each EP "
                         "rank: split each rank's micro-batches to micro_batch_count(model, count) "
                         "(k15_megatron.train.packed.split_to_count)")


def image_inputs(micro_batch: dict) -> dict:
    """The image entries of a vision-language micro-batch, passed to the model by keyword:
    ``pixel_values`` [P, patch values] and ``image_grid_thw`` [I, 3], the images in the order of
    their tokens in ``input_ids`` (padded: row-major over the batch; packed: sequence by
    sequence, :func:`k15_megatron.train.packed.pack_sequences`). A vision-language model's
    ``position_ids`` are M-RoPE's [3, B, S] (packed: [3, 1, T]), also in a micro-batch without
    images. ``{}`` for a text micro-batch."""
    return {key: micro_batch[key] for key in ("pixel_values", "image_grid_thw") if key in micro_batch}


def forward_backward(model, micro_batches: Sequence[dict], loss_fn: Callable, *,
                     forward_only: bool = False) -> list[dict]:
    """Run all ``micro_batches`` forward (and backward unless ``forward_only``); see the module
    docstring for the micro-batch kinds and the loss function's contract.

    Returns the metrics dicts of every micro-batch on the last pipeline stage, [] elsewhere.
    Gradients accumulate into the parameters' ``main_grad`` (Megatron DDP) or ``grad``.

    Raises:
        ValueError: no micro-batches, packed and padded ones mixed, a row length that is not a
            multiple of :func:`packing_multiple`, shapes that differ under PP without
            ``variable_seq_lengths``, an attention mask under CP > 1, or expert-parallel ranks
            with different micro-batch counts.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    batches = list(micro_batches)
    _check_expert_parallel_counts(model, len(batches))
    seq_length, micro_batch_size = _check_shapes(batches, model=model)
    cp_size, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    iterator = iter(batches)

    def forward_step(data_iterator, chunk):
        # The one place micro-batches built on the host reach the device (a no-op for tensors
        # already there), cut to this CP rank first; the loss function sees the same micro-batch.
        mb = next(data_iterator)
        if is_packed(mb):
            mb = to_device(cp_rank_share(mb, cp_size=cp_size, cp_rank=cp_rank))
            output = chunk(mb["input_ids"], mb["position_ids"], None, labels=mb.get("labels"),
                           packed_seq_params=_packed_seq_params(mb), **image_inputs(mb))
        else:
            mb = to_device(padded_cp_share(mb, cp_size=cp_size, cp_rank=cp_rank))
            output = chunk(mb["input_ids"], mb["position_ids"], mb.get("attention_mask"), labels=mb.get("labels"),
                           **image_inputs(mb))

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
def forward_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                   images: dict | None = None):
    """Vocabulary-parallel logits [B, S, V_pad/TP] of one padded batch on the last stage, None
    elsewhere (under CP > 1: this rank's [B, S/CP] share of the positions, see
    :func:`padded_cp_share`). ``images``: a vision-language model's ``pixel_values`` and
    ``image_grid_thw`` (see :func:`image_inputs`)."""
    from megatron.core import parallel_state

    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=compute_device()).unsqueeze(0).expand_as(input_ids)
    batch = {"input_ids": input_ids, "position_ids": position_ids, **(images or {})}

    def keep_logits(mb, logits):
        return logits.new_zeros(()), torch.tensor(1, dtype=torch.int, device=logits.device), {"logits": logits.detach()}

    for chunk in _as_list(model):
        chunk.eval()
    outputs = forward_backward(model, [batch], keep_logits, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return outputs[0]["logits"]
