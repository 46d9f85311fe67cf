"""Portable core attention for Megatron-Core's local layer spec: exact causal attention with
PyTorch's scaled_dot_product_attention, for padded (sbhd) and packed (THD) batches, with or
without context parallelism.

Megatron-Core's local ``DotProductAttention`` materialises [B, heads, S, S] scores, refuses
packed sequences (``PackedSeqParams``) and context parallelism (it asserts CP == 1: CP attention
comes from Transformer Engine). :class:`SdpaCoreAttention` takes its place in the local spec
(:func:`k15_megatron.models.specs.gpt_layer_spec`) and computes the same function:

* Packed (``packed_seq_params.qkv_format == "thd"``): query/key/value [T_local, heads, dim];
  sequence i occupies ``cu_seqlens_q_padded[i]:[i+1]`` of the WHOLE packed batch, and a token
  attends to earlier tokens of its own sequence only. Padding sits at the end of each padded
  sequence, so no real token attends to it.
* Padded (sbhd): query/key/value [S_local, B, heads, dim], each of the B rows one sequence;
  causal, or the boolean ``attention_mask`` [B, 1, S, S] (True = masked, Megatron's convention)
  when one is given (CP = 1 only).
* Context parallelism (CP > 1): each rank holds chunks r and 2*CP-1-r of every sequence
  (:mod:`k15_megatron.parallel.context`). Keys and values are all-gathered over the CP group
  (backward: reduce-scatter of their gradients, Megatron's sequence-parallel gather applied to
  the CP group) and put back in natural order; each local query chunk then attends, causally
  by global position, to the keys up to its own end. Memory per layer: the full sequence's
  K/V (the all-gather scheme; TE's ``p2p`` ring on GPUs avoids that).

Queries are processed in blocks; the first block of a sequence uses SDPA's own causal flag,
later ones a [rows, keys] boolean mask of at most :data:`MASK_ELEMENTS` elements, so no [S, S]
tensor is ever formed. A masked block is recomputed in backward (activation checkpointing of
that block alone) rather than keeping its mask, which PyTorch's CPU kernel copies to float32 and
would keep for backward: the masks of all blocks together grow with the square of the sequence.
Memory kept per layer is then linear in the sequence (queries, gathered K/V, outputs); the cost
is one more forward of the masked blocks. Grouped-query attention uses SDPA's ``enable_gqa``.

Errors: a ``softmax_type`` other than "vanilla", an attention bias, or an ``attention_mask``
under CP > 1 raise ValueError.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from k15_megatron.parallel.context import natural_order_index

QUERY_BLOCK = 4096
"""Most query rows per SDPA call."""

MASK_ELEMENTS = 1 << 24
"""Most elements of one block's [rows, keys] mask: PyTorch's CPU kernel turns a boolean mask
into a float one, so rows per masked block shrink as keys grow (at least 128 rows)."""


def _block_rows(keys: int) -> int:
    return min(QUERY_BLOCK, max(128, MASK_ELEMENTS // max(keys, 1)))


def _masked_block(q, k, v, start: int, scale: float, dropout: float, gqa: bool) -> torch.Tensor:
    """Queries at positions [start, start + rows) against keys [0, start + rows), causal by
    position, through a [rows, keys] boolean mask."""
    end = k.shape[2]
    allowed = torch.arange(end, device=q.device).unsqueeze(0) <= torch.arange(start, end, device=q.device).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, dropout_p=dropout, enable_gqa=gqa)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, scale: float,
                      dropout: float) -> torch.Tensor:
    """Attention of queries at positions [q_start, q_start + Lq) of one sequence to its keys at
    positions [0, Lk), Lk = q_start + Lq, each query seeing keys at positions <= its own.
    q [1, Hq, Lq, D], k/v [1, Hkv, Lk, D] -> [1, Hq, Lq, D]."""
    gqa = q.shape[1] != k.shape[1]
    outputs = []
    a = 0
    while a < q.shape[2]:
        if q_start + a == 0:  # SDPA's own causal flag: no mask is formed
            b = min(QUERY_BLOCK, q.shape[2])
        else:
            b = min(a + _block_rows(q_start + a + QUERY_BLOCK), q.shape[2])
        start, end = q_start + a, q_start + b
        keys, values = k[:, :, :end], v[:, :, :end]
        if start == 0:
            out = F.scaled_dot_product_attention(q[:, :, a:b], keys, values, is_causal=True, scale=scale,
                                                 dropout_p=dropout, enable_gqa=gqa)
        elif torch.is_grad_enabled() and q.requires_grad:
            # The kernel would keep the block's float mask for backward (quadratic in the
            # sequence over all blocks): recompute the block in backward instead.
            out = torch.utils.checkpoint.checkpoint(_masked_block, q[:, :, a:b], keys, values, start, scale,
                                                    dropout, gqa, use_reentrant=False)
        else:
            out = _masked_block(q[:, :, a:b], keys, values, start, scale, dropout, gqa)
        outputs.append(out)
        a = b
    return torch.cat(outputs, dim=2)


class SdpaCoreAttention(torch.nn.Module):
    """Drop-in ``core_attention`` for Megatron's SelfAttention (see the module docstring).

    Constructed by Megatron with DotProductAttention's arguments; ``forward(query, key, value,
    attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None)`` returns
    [S_local, B, heads/TP * dim] (sbhd) or [T_local, heads/TP * dim] (THD), ``dim`` the value
    width. Multi-latent attention passes ``k_channels`` / ``v_channels`` (query/key and value
    widths differ there); SDPA takes both from the tensors, so they are not needed beyond that.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None):
        super().__init__()
        from megatron.core import parallel_state

        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SdpaCoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        self.config = config
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group if config.context_parallel_size > 1 else None
        self.cp_size = config.context_parallel_size
        self._order_cache: dict = {}

    def _cp_rank(self) -> int:
        return torch.distributed.get_rank(self.cp_group)

    def _gather_natural(self, x: torch.Tensor, padded_lengths: tuple) -> torch.Tensor:
        """All-gather ``x`` [T_local, ...] over the CP group along dim 0 (backward: reduce-scatter)
        and reorder to the packed batch's natural token order, [T, ...]."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        gathered = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.cp_group)
        key = (padded_lengths, x.device)
        if key not in self._order_cache:
            self._order_cache = {key: natural_order_index(list(padded_lengths), cp_size=self.cp_size).to(x.device)}
        return gathered.index_select(0, self._order_cache[key])

    def _local_chunks(self, length: int) -> list[tuple[int, int, int]]:
        """(local offset, global start, size) of this rank's query chunks of a sequence of padded
        ``length`` (one chunk [0, length) without CP)."""
        if self.cp_group is None:
            return [(0, 0, length)]
        size = length // (2 * self.cp_size)
        rank = self._cp_rank()
        return [(0, rank * size, size), (size, (2 * self.cp_size - 1 - rank) * size, size)]

    def _sequence(self, q, k, v) -> torch.Tensor:
        """One sequence: q [Lq_local, Hq, D] (this rank's chunks), k/v [L, Hkv, D] (whole) ->
        [Lq_local, Hq, D]."""
        qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, L, D]
        dropout = self.dropout if self.training else 0.0
        outs = []
        for offset, start, size in self._local_chunks(k.shape[0]):
            if size == 0:
                continue
            outs.append(_causal_attention(qh[:, :, offset:offset + size], kh[:, :, :start + size],
                                          vh[:, :, :start + size], q_start=start, scale=self.scale,
                                          dropout=dropout))
        return torch.cat(outs, dim=2).squeeze(0).transpose(0, 1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SdpaCoreAttention does not support an attention bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, packed_seq_params)
        return self._forward_sbhd(query, key, value, attention_mask)

    def _forward_thd(self, query, key, value, params):
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        padded = tuple((cu[1:] - cu[:-1]).tolist())
        if self.cp_group is not None:
            key, value = self._gather_natural(key, padded), self._gather_natural(value, padded)
        outs, q_at, kv_at = [], 0, 0
        for length in padded:
            local = length // self.cp_size
            outs.append(self._sequence(query[q_at:q_at + local], key[kv_at:kv_at + length],
                                       value[kv_at:kv_at + length]))
            q_at += local
            kv_at += length
        out = torch.cat(outs, dim=0)
        return out.reshape(out.shape[0], -1)

    def _forward_sbhd(self, query, key, value, attention_mask):
        s_local, batch = query.shape[0], query.shape[1]
        if attention_mask is not None:
            if self.cp_group is not None:
                raise ValueError("an explicit attention_mask is not supported under context parallelism; "
                                 "pack the sequences (THD) instead")
            allowed = ~attention_mask.bool()  # [B or 1, 1, S, S]
            qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, H, S, D]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=self.scale,
                                                 dropout_p=self.dropout if self.training else 0.0,
                                                 enable_gqa=qh.shape[1] != kh.shape[1])
            return out.permute(2, 0, 1, 3).reshape(s_local, batch, -1)
        if self.cp_group is not None:
            full = (s_local * self.cp_size,)
            key, value = self._gather_natural(key, full), self._gather_natural(value, full)
        rows = [self._sequence(query[:, b], key[:, b], value[:, b]) for b in range(batch)]
        return torch.stack(rows, dim=1).reshape(s_local, batch, -1)
