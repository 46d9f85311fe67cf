"""Memory-bounded token log-probs over a vocabulary that may be sharded across TP ranks.

``token_logprobs`` returns log softmax(logits)[label] per token (and optionally the entropy of
the token distribution) without ever materialising a [tokens, vocab] float tensor beyond one
chunk: the tokens are processed ``chunk_size`` at a time, and the backward pass recomputes each
chunk's logits instead of storing probabilities. Saved for backward: the inputs (which exist
anyway) plus two float32 numbers per token (log-normaliser, entropy). So the extra memory is
O(chunk_size * V_local) instead of O(S * B * V), what makes 128k-token responses with a 150k
vocabulary trainable.

Vocabulary parallelism follows Megatron's convention: TP rank r of group g holds vocabulary rows
[r * V_local, (r + 1) * V_local). A label outside a rank's range contributes 0 to that rank's
target logit; the max, the normaliser and the target logit are all-reduced over ``group``, as
in Megatron's vocab-parallel cross entropy. The input may be:

- logits [..., V_local] (e.g. Megatron's [S, B, V_local] output): gradients are local, or
- hidden [..., H] and the output weight [V_local, H]: the logits are formed per chunk
  (hidden @ weight.T), the weight gradient is local to the shard, and the hidden gradient is the
  sum of all shards' contributions (all-reduced, like ColumnParallelLinear's input copy) unless
  ``reduce_hidden_grad=False`` (a sequence-parallel caller whose gather does the reduction).

All arithmetic on logits is float32 whatever the input dtype. With a non-float32 weight that
means one float32 copy of the weight shard [V_local, H] for the duration of forward and of
backward (independent of the sequence length), plus float32 gradient accumulators.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> None:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)


# Logit given to vocabulary-padding columns: exp() of it is exactly 0, and unlike -inf it keeps
# p * logit (entropy) and its gradient at 0 instead of NaN.
_PADDING_LOGIT = -1e30


def _chunk_logits(x: torch.Tensor, w32: Optional[torch.Tensor], s: int, e: int,
                  temperature: float, pad_from: Optional[int] = None) -> torch.Tensor:
    """[e - s, V_local] float32 logits of tokens s..e, divided by the temperature; local columns
    from ``pad_from`` on (vocabulary padding) are masked out.

    Always a fresh buffer (never a view of ``x``), so callers may modify it in place.
    """
    if w32 is None:
        z = x[s:e].to(torch.float32, copy=True)
    else:
        z = x[s:e].float() @ w32.t()
    if temperature != 1.0:
        z /= temperature
    if pad_from is not None:
        z[:, pad_from:] = _PADDING_LOGIT
    return z


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward: per-chunk log-prob of the labels (+ entropy). Backward: recompute each chunk."""

    @staticmethod
    def forward(ctx, x, weight, labels, group, chunk_size, temperature, want_entropy,
                reduce_hidden_grad, vocab_size):
        num_tokens, vocab_local = x.shape[0], (x.shape[1] if weight is None else weight.shape[0])
        rank = dist.get_rank(group) if group is not None else 0
        vocab_start = rank * vocab_local
        pad_from = None
        if vocab_size is not None and vocab_size < vocab_start + vocab_local:
            pad_from = max(0, vocab_size - vocab_start)
        w32 = None if weight is None else weight.float()
        logprob = torch.empty(num_tokens, dtype=torch.float32, device=x.device)
        lse_all = torch.empty_like(logprob)
        ent_all = torch.empty_like(logprob) if want_entropy else None
        for s in range(0, num_tokens, chunk_size):
            e = min(s + chunk_size, num_tokens)
            z = _chunk_logits(x, w32, s, e, temperature, pad_from)
            local = labels[s:e] - vocab_start
            in_range = (local >= 0) & (local < vocab_local)
            target = z.gather(1, local.clamp(0, vocab_local - 1).unsqueeze(1)).squeeze(1)
            target = torch.where(in_range, target, torch.zeros_like(target))
            zmax = z.max(dim=1).values
            _all_reduce(zmax, dist.ReduceOp.MAX, group)
            if want_entropy:  # z is still needed: one more [n, V_local] buffer
                ez = (z - zmax.unsqueeze(1)).exp_()
                parts = [ez.sum(dim=1), target, torch.bmm(ez.unsqueeze(1), z.unsqueeze(2)).view(-1)]
            else:  # in place: one [n, V_local] buffer per chunk
                ez = z.sub_(zmax.unsqueeze(1)).exp_()
                parts = [ez.sum(dim=1), target]
            del ez, z
            stacked = torch.stack(parts)
            _all_reduce(stacked, dist.ReduceOp.SUM, group)  # one collective for all sums
            sumexp = stacked[0]
            lse = zmax + torch.log(sumexp)
            logprob[s:e] = stacked[1] - lse
            lse_all[s:e] = lse
            if want_entropy:
                ent_all[s:e] = lse - stacked[2] / sumexp
        ctx.save_for_backward(x, weight, labels, lse_all, ent_all)
        ctx.group, ctx.chunk_size, ctx.temperature = group, chunk_size, temperature
        ctx.vocab_start, ctx.vocab_local, ctx.pad_from = vocab_start, vocab_local, pad_from
        ctx.reduce_hidden_grad = reduce_hidden_grad
        if want_entropy:
            return logprob, ent_all.clone()
        return logprob

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy=None):
        x, weight, labels, lse_all, ent_all = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w32 = None if weight is None else weight.float()
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        grad_w = torch.zeros_like(w32) if (need_w and weight is not None) else None
        if not (need_x or need_w):
            return (None,) * 9
        vocab_local, t = ctx.vocab_local, ctx.temperature
        for s in range(0, x.shape[0], ctx.chunk_size):
            e = min(s + ctx.chunk_size, x.shape[0])
            # In-place on one [n, V_local] buffer: logits -> log p -> p or the entropy term.
            logp = _chunk_logits(x, w32, s, e, t, ctx.pad_from)
            logp -= lse_all[s:e].unsqueeze(1)
            g = grad_logprob[s:e].float().unsqueeze(1)
            if grad_entropy is not None and ent_all is not None:
                # dlogprob/dz = onehot - p and dH/dz = -p (log p + H), so
                # grad_z = onehot * g - p * (g + gH * (log p + H)).
                p = torch.exp(logp)
                gh = grad_entropy[s:e].float().unsqueeze(1)
                grad_z = logp.add_(ent_all[s:e].unsqueeze(1)).mul_(gh).add_(g).mul_(p).neg_()
                del p
            else:
                grad_z = logp.exp_().mul_(-g)
            local = labels[s:e] - ctx.vocab_start
            rows = ((local >= 0) & (local < vocab_local)).nonzero(as_tuple=True)[0]
            grad_z[rows, local[rows]] += g[rows, 0]
            if t != 1.0:
                grad_z /= t
            if weight is None:
                grad_x[s:e] = grad_z
            else:
                if need_x:
                    grad_x[s:e] = grad_z @ w32
                if need_w:
                    grad_w += grad_z.t() @ x[s:e].float()
            # Free this chunk's block before the next one is formed: one [n, V_local] at a time.
            del logp, grad_z
        if weight is not None and need_x and ctx.reduce_hidden_grad:
            _all_reduce(grad_x, dist.ReduceOp.SUM, ctx.group)
        grad_x = grad_x.to(x.dtype) if grad_x is not None else None
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None, None, None, None, None, None


def token_logprobs(
    hidden_or_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    chunk_size: int = 2048,
    temperature: float = 1.0,
    return_entropy: bool = False,
    reduce_hidden_grad: bool = True,
    vocab_size: Optional[int] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """log softmax(logits / temperature)[label] per token, chunked, over a TP-sharded vocabulary.

    Args:
        hidden_or_logits: logits [..., V_local] when ``weight`` is None, else hidden states
            [..., H] (full, i.e. not sequence-parallel-scattered). Leading dims are arbitrary
            (Megatron: [S, B]); they are flattened and processed in chunks of tokens.
        labels: int64 [...] with the same leading dims: GLOBAL vocabulary ids. Ids outside
            [0, V) give a meaningless finite value; mask those positions downstream.
        weight: the output-layer weight shard [V_local, H], or None for the logits path.
        group: the tensor-parallel process group across which the vocabulary is sharded, rank r
            owning ids [r * V_local, (r + 1) * V_local); None = the whole vocabulary is local.
            Every rank of the group must call with the same labels and token count.
        chunk_size: tokens per chunk; the float32 [chunk_size, V_local] blocks alive at once
            are one (forward and backward) or two (forward with ``return_entropy``).
        temperature: logits are divided by it (match the sampler's processed log-probs).
        return_entropy: also return the per-token entropy of the (tempered) distribution, with
            its gradient (dH/dz = -p (log p + H)); costs one more reduction per chunk.
        reduce_hidden_grad: weight path under TP: all-reduce the hidden gradient over ``group``
            (True, the usual replicated-input case) or return this shard's partial sum.
        vocab_size: the real vocabulary size when the (sharded) vocabulary is padded, as
            Megatron pads it: columns of ids >= vocab_size are excluded from the softmax, so the
            log-probs are those of the unpadded model (what vLLM and transformers compute).

    Returns:
        float32 log-probs shaped like ``labels`` (and the entropy, same shape, if requested).
        Gradients flow to ``hidden_or_logits`` and ``weight``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = tuple(hidden_or_logits.shape[:-1])
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the leading dims {lead} "
                         f"of hidden_or_logits {tuple(hidden_or_logits.shape)}")
    if weight is not None and (weight.dim() != 2 or weight.shape[1] != hidden_or_logits.shape[-1]):
        raise ValueError(f"weight {tuple(weight.shape)} must be [V_local, H] with H = "
                         f"{hidden_or_logits.shape[-1]}")
    x = hidden_or_logits.reshape(-1, hidden_or_logits.shape[-1])
    flat_labels = labels.reshape(-1).long()
    out = _ChunkedLogprobs.apply(x, weight, flat_labels, group, chunk_size, float(temperature),
                                 return_entropy, reduce_hidden_grad, vocab_size)
    if return_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead)
