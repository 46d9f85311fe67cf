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
mirror-descent loss, the log-prob check after a weight sync): micro-batches of at most a given
number of rows through Megatron's pipeline schedule, the [B, T-1] result kept on the compute
device and returned on every rank. ``tools/bench/logprobs_memory.py`` measures this path.

:func:`micro_batch_split` is the one rule for cutting N items (rows, or whole groups in the RL
update) into micro-batches of at most a given size: as few micro-batches as that bound allows,
all of one size (Megatron's pipeline schedules send activations of a fixed [S, B, H] shape
between stages), the last one filled up with padding that is computed and discarded.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from k15_megatron.models.gpt import unwrap_model
from k15_megatron.parallel.device import compute_device
from k15_megatron.rl.logprobs import token_logprobs
from k15_megatron.train.schedule import forward_backward


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
    """Within the block, the model chunk holding the output layer returns hidden states
    [B, S, H] where it returned logits [B, S, V/TP]; yields this rank's :class:`OutputHead`
    (weight None on ranks without the output layer). Restores the output layer on exit."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    head = OutputHead(weight=None, group=group, sequence_parallel=False)
    patched = []
    for chunk in (model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]):
        model = unwrap_model(chunk)
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


def micro_batch_split(num_items: int, *, max_per_micro_batch: int) -> tuple[int, int]:
    """(number of micro-batches M, items per micro-batch P) for ``num_items`` items, at most
    ``max_per_micro_batch`` per micro-batch: M = ceil(N / max), P = ceil(N / M) <= max. The
    M micro-batches of P slots hold the N items in order; the last holds N - (M-1)P of them and
    M*P - N < M padding slots (e.g. 9 items, at most 8: two micro-batches of 5, the last with
    one padding slot).

    Raises:
        ValueError: ``num_items`` < 1 or ``max_per_micro_batch`` < 1.
    """
    if num_items < 1 or max_per_micro_batch < 1:
        raise ValueError(f"cannot split {num_items} items into micro-batches of at most {max_per_micro_batch}")
    count = -(-num_items // max_per_micro_batch)
    return count, -(-num_items // count)


@torch.no_grad()
def sequence_token_logprobs(model_chunks, input_ids: torch.Tensor, *, vocab_size: int,
                            temperature: float = 1.0, micro_batch_size: int | None = None,
                            chunk_size: int = 2048) -> torch.Tensor:
    """log p(input_ids[b, t] | input_ids[b, :t]) for t >= 1, as a [B, T-1] float32 tensor on
    :func:`compute_device`, equal on every rank (collective over the model-parallel groups).

    ``input_ids`` [B, T] must be the same on every rank of the model-parallel group (right
    padding is fine: mask the result). The model runs at most ``micro_batch_size`` rows at a time
    (default: all B) through the pipeline schedule, in :func:`micro_batch_split` micro-batches
    (the last one padded with rows of token 0 whose log-probs are dropped), and each
    micro-batch's log-probs are formed from hidden states ``chunk_size`` tokens at a time, so the
    memory is set by those two numbers, not by B. ``temperature`` divides the logits first
    (match the sampler's processed log-probs).

    Raises:
        ValueError: ``micro_batch_size`` < 1 or an empty batch.
    """
    batch_size, seq_len = input_ids.shape
    count, rows = micro_batch_split(batch_size, max_per_micro_batch=micro_batch_size or batch_size)
    padded = input_ids
    if count * rows > batch_size:
        padded = torch.cat([input_ids, input_ids.new_zeros(count * rows - batch_size, seq_len)])
    positions = torch.arange(seq_len).unsqueeze(0).expand(rows, -1)  # moved per micro-batch by the schedule
    micro_batches = [{"input_ids": padded[i:i + rows], "position_ids": positions, "index": i}
                     for i in range(0, count * rows, rows)]
    device = compute_device()
    result = torch.zeros(batch_size, seq_len - 1, dtype=torch.float32, device=device)
    for chunk in (model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]):
        chunk.eval()
    with hidden_state_output(model_chunks) as head:
        def collect(mb, hidden):
            lp = head.token_logprobs(hidden[:, :-1], mb["input_ids"][:, 1:], vocab_size=vocab_size,
                                     chunk_size=chunk_size, temperature=temperature)
            keep = min(lp.shape[0], batch_size - mb["index"])  # padding rows are dropped
            result[mb["index"]: mb["index"] + keep] = lp[:keep]
            return hidden.new_zeros(()), torch.ones((), dtype=torch.int, device=device), {}

        forward_backward(model_chunks, micro_batches, collect, forward_only=True)
    return _broadcast_from_last_stage(result)
