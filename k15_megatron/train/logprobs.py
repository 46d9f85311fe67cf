"""The trainer's token log-probs: the output head that the RL loss and the recompute use.

Megatron's GPTModel ends in the output layer, whose [S, B, V/TP] logits (in the model dtype,
then copied to [B, S, V/TP] and, under Float16Module, upcast to float32) exist whole for the
micro-batch, with a gradient of the same size in backward. At 8k tokens and a 152k vocabulary
that is 4.6 GiB per float32 copy. So the log-prob paths here never let the model form logits:

- :func:`hidden_state_output` makes the last pipeline stage return its final hidden states
  [B, S, H] (after the final norm, gathered over the sequence-parallel region if any) instead of
  logits, and hands back the :class:`OutputHead` (the output weight shard [V/TP, H] and the
  vocabulary-parallel group);
- :meth:`OutputHead.token_logprobs` forms the logits chunk by chunk inside
  :func:`k15_megatron.rl.logprobs.token_logprobs` (hidden + weight path), so forward and backward
  hold at most one [chunk, V/TP] float32 block; the weight gradient reaches the parameter
  through autograd, as from Megatron's own ColumnParallelLinear.

:func:`sequence_token_logprobs` is the forward-only recompute (reference log-probs of the
mirror-descent loss, the log-prob check after a weight sync): the rows' real tokens (right
padding cut off) packed into THD micro-batches by a token budget and a row cap, through
Megatron's pipeline schedule; each CP rank forms the log-probs of its own tokens from the hidden
states (never the full vocabulary or the full sequence), and the per-token float32 results are
all-gathered over the CP group into the [B, T-1] result, kept on the compute device and returned
on every rank. ``tools/bench/logprobs_memory.py`` measures this path.

Rows given with ``images=`` (a Qwen2-VL / Qwen2.5-VL model) run as padded micro-batches instead
(:func:`padded_image_micro_batches`): each row with its own M-RoPE positions ([3, B, S],
:func:`k15_megatron.models.qwen2_vl.mrope_position_ids`), the micro-batch's images passed to the
model with it. Right padding is causally masked out of every real token's attention, so the
values equal the unpadded row's; the price is B x the longest row per micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import torch

from k15_megatron.models.gpt import unwrap_model
from k15_megatron.parallel.context import natural_order_index, padded_length
from k15_megatron.parallel.device import compute_device
from k15_megatron.rl.logprobs import token_logprobs
from k15_megatron.train.packed import next_token, pack_sequences, padded_lengths, split_to_count, token_budget_groups
from k15_megatron.train.schedule import forward_backward, micro_batch_count, packing_multiple


@dataclasses.dataclass
class OutputHead:
    """The output layer of this rank's last pipeline stage, as the log-prob loss needs it.

    ``weight`` is the output weight shard [V_pad/TP, H] (the tied embedding's copy when
    embeddings are shared), ``group`` the tensor-parallel group the vocabulary is split over
    (None at TP=1), ``sequence_parallel`` whether the hidden states were gathered from the
    sequence-parallel region (then that gather's backward sums the TP ranks' partial hidden
    gradients, so token_logprobs must not all-reduce them again).
    """

    weight: Optional[torch.Tensor]
    group: Optional[object]
    sequence_parallel: bool

    def token_logprobs(self, hidden_BSH: torch.Tensor, labels_BS: torch.Tensor, *, vocab_size: int,
                       chunk_size: int, temperature: float = 1.0) -> torch.Tensor:
        """log softmax(hidden @ weight.T / temperature)[label] of the unpadded vocabulary, [B, S]
        float32, chunked over tokens (at most one [chunk_size, V/TP] float32 block alive)."""
        if self.weight is None:
            raise RuntimeError("OutputHead.token_logprobs called on a rank without the output layer")
        return token_logprobs(hidden_BSH, labels_BS, weight=self.weight, group=self.group,
                              chunk_size=chunk_size, temperature=temperature, vocab_size=vocab_size,
                              reduce_hidden_grad=not self.sequence_parallel)


def _hidden_forward(layer, group):
    """A replacement for ColumnParallelLinear.forward that returns its (full-sequence) input."""
    def forward(input_, weight=None, runtime_gather_output=None):
        if getattr(layer, "sequence_parallel", False):
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=group)
        return input_, None
    return forward


@contextlib.contextmanager
def hidden_state_output(model_chunks):
    """Within the block, the model chunk holding the output layer (a GPTModel, or the language
    model of a Qwen2-VL model) returns hidden states [B, S, H] where it returned logits
    [B, S, V/TP]; yields this rank's :class:`OutputHead`
    (weight None on ranks without the output layer). Restores the output layer on exit."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    head = OutputHead(weight=None, group=group, sequence_parallel=False)
    patched = []
    for chunk in (model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]):
        model = unwrap_model(chunk)
        model = getattr(model, "language_model", model)  # a vision-language model's GPTModel
        if not getattr(model, "post_process", False):
            continue
        layer = model.output_layer
        shared = getattr(model, "share_embeddings_and_output_weights", False)
        head.weight = model.shared_embedding_or_output_weight() if shared else layer.weight
        head.sequence_parallel = bool(getattr(layer, "sequence_parallel", False))
        layer.forward = _hidden_forward(layer, group)
        patched.append(layer)
    try:
        yield head
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward


def _broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return tensor


def _gather_context_parallel(local: torch.Tensor, sequence_lengths: list[int]) -> torch.Tensor:
    """This CP rank's per-token values [T/CP] (its tokens in Megatron's load-balanced order) ->
    the whole packed batch's [T] in packed order, on every CP rank (all-gather);
    ``sequence_lengths``: the packed batch's padded sequence lengths."""
    from megatron.core import parallel_state as ps

    cp_size = ps.get_context_parallel_world_size()
    if cp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(cp_size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_context_parallel_group())
    order = natural_order_index(sequence_lengths, cp_size=cp_size).to(local.device)
    return torch.cat(parts).index_select(0, order)


def _row_groups(lengths: list[int], *, multiple: int, max_rows: int, max_tokens: int | None,
                count_for: Callable[[int], int] | None):
    """(each row's length padded to ``multiple``, the micro-batches' row groups): consecutive rows
    up to ``max_tokens`` padded tokens (None: no budget) and ``max_rows`` rows, split to
    ``count_for(this rank's count)`` groups when given."""
    padded = [padded_length(n, multiple) for n in lengths]
    groups = token_budget_groups(padded, max_tokens=max_tokens or sum(padded), max_items=max_rows)
    if count_for is not None:
        groups = split_to_count(groups, padded, count_for(len(groups)))
    return padded, groups


def packed_logprob_micro_batches(input_ids: torch.Tensor, lengths: list[int], *, multiple: int,
                                 max_rows: int, max_tokens: int | None,
                                 count_for: Callable[[int], int] | None = None) -> list[dict]:
    """Packed micro-batches (:func:`k15_megatron.train.packed.pack_sequences`) of the rows of
    ``input_ids`` [B, T] cut to ``lengths``: per token ``input_ids`` and ``targets`` (the next
    token of the same sequence; 0 on each sequence's last token, whose log-prob is dropped),
    ``rows`` (the row of each sequence). Consecutive rows fill a micro-batch up to ``max_tokens``
    padded tokens (None: no budget) and ``max_rows`` rows (:func:`token_budget_groups`);
    ``count_for`` (a collective such as :func:`k15_megatron.train.schedule.micro_batch_count`)
    turns this rank's count into the count to run (:func:`split_to_count`)."""
    padded, groups = _row_groups(lengths, multiple=multiple, max_rows=max_rows, max_tokens=max_tokens,
                                 count_for=count_for)
    batches = []
    for rows in groups:
        sequences = []
        for row in rows:
            ids = input_ids[row, :lengths[row]]
            sequences.append({"input_ids": ids, "targets": next_token(ids)})
        batches.append({**pack_sequences(sequences, multiple=multiple), "rows": rows})
    return batches


def padded_image_micro_batches(input_ids: torch.Tensor, lengths: list[int], images: list, *, vision,
                               multiple: int, max_rows: int, max_tokens: int | None,
                               count_for: Callable[[int], int] | None = None) -> list[dict]:
    """Padded micro-batches of the rows of ``input_ids`` [B, T] cut to ``lengths`` for a
    vision-language model: ``input_ids`` and ``targets`` (the next token; 0 on a row's last
    token and on padding) [b, S] with S the longest row of the micro-batch rounded up to
    ``multiple``, M-RoPE ``position_ids`` [3, b, S], ``rows``, and when any of its rows has
    images the concatenated ``pixel_values`` [patches, values] and ``image_grid_thw`` [I, 3]
    (rows in order). ``images[row]``: None or ``{"pixel_values", "image_grid_thw"}`` of that
    row's images in prompt order; ``vision``: the model's VisionArch. Grouping as in
    :func:`packed_logprob_micro_batches`.

    Raises:
        ValueError: ``images`` not one entry per row.
    """
    from k15_megatron.models.qwen2_vl import mrope_position_ids

    if len(images) != input_ids.shape[0]:
        raise ValueError(f"images must hold one entry (None or a dict) per row: {len(images)} for "
                         f"{input_ids.shape[0]} rows")
    padded, groups = _row_groups(lengths, multiple=multiple, max_rows=max_rows, max_tokens=max_tokens,
                                 count_for=count_for)
    batches = []
    for rows in groups:
        width = max(padded[row] for row in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :lengths[row]] = input_ids[row, :lengths[row]]
            targets[i, :lengths[row]] = next_token(input_ids[row, :lengths[row]])
        present = [images[row] for row in rows if images[row] is not None]
        pixels = {key: torch.cat([im[key] for im in present]) for key in ("pixel_values", "image_grid_thw")} \
            if present else {}
        positions = mrope_position_ids(ids, pixels.get("image_grid_thw"), image_token_id=vision.image_token_id,
                                       vision_start_token_id=vision.vision_start_token_id,
                                       spatial_merge_size=vision.spatial_merge_size)
        batches.append({"input_ids": ids, "targets": targets, "position_ids": positions, "rows": rows, **pixels})
    return batches


def _micro_batches(model_chunks, input_ids: torch.Tensor, row_lengths: list[int], images, *,
                   max_rows: int, max_tokens: int | None) -> list[dict]:
    """Packed micro-batches for text rows, padded ones with M-RoPE positions when ``images``."""
    count_for = functools.partial(micro_batch_count, model_chunks)
    multiple = packing_multiple(model_chunks)
    if images is None:
        return packed_logprob_micro_batches(input_ids, row_lengths, multiple=multiple, max_rows=max_rows,
                                            max_tokens=max_tokens, count_for=count_for)
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    vision = getattr(unwrap_model(chunks[0]), "vision_arch", None)
    if vision is None:
        raise ValueError("sequence_token_logprobs got images for a model without a vision tower")
    return padded_image_micro_batches(input_ids, row_lengths, list(images), vision=vision, multiple=multiple,
                                      max_rows=max_rows, max_tokens=max_tokens, count_for=count_for)


@torch.no_grad()
def sequence_token_logprobs(model_chunks, input_ids: torch.Tensor, *, vocab_size: int,
                            temperature: float = 1.0, micro_batch_size: int | None = None,
                            micro_batch_tokens: int | None = None, lengths: torch.Tensor | None = None,
                            chunk_size: int = 2048, images: list | None = None) -> torch.Tensor:
    """log p(input_ids[b, t] | input_ids[b, :t]) for 1 <= t < lengths[b], as a [B, T-1] float32
    tensor on :func:`compute_device`, equal on every rank (collective over the model-parallel
    groups); entries at t >= lengths[b] are 0.

    ``input_ids`` [B, T] must be the same on every rank of the model-parallel group; ``lengths``
    [B] (default: T for every row) is each row's real length (its last non-pad token + 1): right
    padding is never run. The rows become sequences of packed micro-batches
    (:func:`packed_logprob_micro_batches`) of at most ``micro_batch_size`` rows (default: all B)
    and ``micro_batch_tokens`` tokens (default: no budget; data.micro_batch_tokens), each
    sequence padded to the layout's multiple (:func:`k15_megatron.train.schedule.packing_multiple`);
    each CP rank's log-probs are formed from hidden states ``chunk_size`` tokens at a time, so the
    memory is set by those numbers, not by B x T. ``temperature`` divides the logits first
    (match the sampler's processed log-probs). ``images`` (a vision-language model): one entry
    per row, None or ``{"pixel_values": [patches, values], "image_grid_thw": [I, 3]}`` of the
    row's images, whose expanded placeholders ``input_ids`` hold; the rows then run as padded
    micro-batches (:func:`padded_image_micro_batches`).

    Raises:
        ValueError: ``micro_batch_size`` or ``micro_batch_tokens`` < 1, an empty batch, a
            length outside [1, T], or ``images`` for a text model or not one per row.
    """
    batch_size, seq_len = input_ids.shape
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"sequence_token_logprobs needs a non-empty batch, got shape {tuple(input_ids.shape)}")
    row_lengths = [seq_len] * batch_size if lengths is None else [int(n) for n in lengths.tolist()]
    if len(row_lengths) != batch_size or not all(1 <= n <= seq_len for n in row_lengths):
        raise ValueError(f"lengths must be {batch_size} values in [1, {seq_len}], got {row_lengths}")
    micro_batches = _micro_batches(model_chunks, input_ids.cpu(), row_lengths, images,
                                   max_rows=micro_batch_size or batch_size, max_tokens=micro_batch_tokens)
    device = compute_device()
    result = torch.zeros(batch_size, seq_len - 1, dtype=torch.float32, device=device)
    for chunk in (model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]):
        chunk.eval()
    with hidden_state_output(model_chunks) as head:
        def collect(mb, hidden):
            if images is not None:  # padded rows [b, S]; CP = 1 for vision-language models
                values = head.token_logprobs(hidden, mb["targets"], vocab_size=vocab_size, chunk_size=chunk_size,
                                             temperature=temperature)
                for i, row in enumerate(mb["rows"]):
                    result[row, :row_lengths[row] - 1] = values[i, :row_lengths[row] - 1]
                return hidden.new_zeros(()), torch.ones((), dtype=torch.int, device=device), {}
            local = head.token_logprobs(hidden, mb["targets"], vocab_size=vocab_size, chunk_size=chunk_size,
                                        temperature=temperature)[0]
            whole = _gather_context_parallel(local, padded_lengths(mb))
            starts = mb["cu_seqlens_padded"].tolist()
            for start, row in zip(starts, mb["rows"]):
                count = row_lengths[row] - 1  # the last token predicts nothing
                result[row, :count] = whole[start:start + count]
            return hidden.new_zeros(()), torch.ones((), dtype=torch.int, device=device), {}

        forward_backward(model_chunks, micro_batches, collect, forward_only=True)
    return _broadcast_from_last_stage(result)
