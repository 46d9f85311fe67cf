"""The trainer's token log-probs of given sequences (forward only, any TP/PP layout).

Used to recompute the policy's log-probs of rollout tokens (the logprob-consistency check after a
weight sync, and the reference log-probs of the mirror-descent loss). Log-probs are those of the
unpadded vocabulary, computed chunk-wise over the TP-sharded logits by
:func:`k15_megatron.rl.logprobs.token_logprobs`, and returned on every rank.
"""

from __future__ import annotations

import torch

from k15_megatron.rl.logprobs import token_logprobs
from k15_megatron.train.schedule import forward_backward


def _broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return tensor


@torch.no_grad()
def sequence_token_logprobs(model_chunks, input_ids: torch.Tensor, *, vocab_size: int,
                            temperature: float = 1.0, micro_batch_size: int | None = None,
                            chunk_size: int = 2048) -> torch.Tensor:
    """log p(input_ids[b, t] | input_ids[b, :t]) for t >= 1, as a [B, T-1] float32 tensor.

    ``input_ids`` [B, T] must be the same on every rank (right padding is fine: mask the
    result). ``temperature`` divides the logits first (match the sampler's processed log-probs).
    """
    from megatron.core import parallel_state as ps

    batch_size, seq_len = input_ids.shape
    mbs = micro_batch_size or batch_size
    if batch_size % mbs:
        raise ValueError(f"batch of {batch_size} sequences is not divisible by micro_batch_size={mbs}")
    positions = torch.arange(seq_len).unsqueeze(0).expand(mbs, -1)
    micro_batches = [{"input_ids": input_ids[i:i + mbs], "position_ids": positions, "index": i}
                     for i in range(0, batch_size, mbs)]
    group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    result = torch.zeros(batch_size, seq_len - 1, dtype=torch.float32)

    def collect(mb, logits):
        lp = token_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], group=group, chunk_size=chunk_size,
                           temperature=temperature, vocab_size=vocab_size)
        result[mb["index"]: mb["index"] + lp.shape[0]] = lp.float().cpu()
        return logits.new_zeros(()), torch.tensor(1, dtype=torch.int), {}

    for chunk in (model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]):
        chunk.eval()
    forward_backward(model_chunks, micro_batches, collect, forward_only=True)
    return _broadcast_from_last_stage(result)
