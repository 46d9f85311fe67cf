"""Packed (THD) micro-batches: variable-length sequences back to back, no padding between them
beyond what context and sequence parallelism need, split per context-parallel rank.

One packed micro-batch is a dict of host tensors (the schedule moves it to the device):

* per-token tensors [1, T], T = the sum of the padded sequence lengths: ``input_ids``,
  ``position_ids`` (0, 1, ... restarting at every sequence), ``sequence_ids`` (which of the
  micro-batch's sequences the token belongs to, -1 on padding) and whatever per-token fields
  the caller packs (labels, loss masks, log-probs; padding takes each field's pad value);
* ``cu_seqlens`` / ``cu_seqlens_padded`` [n+1] int32: cumulative real and padded lengths
  (Megatron's ``PackedSeqParams`` fields), ``max_seqlen`` (int, the longest padded sequence),
  ``num_sequences`` (n);
* for a vision-language model: ``pixel_values`` [P, patch values] and ``image_grid_thw`` [I, 3],
  the images of every sequence that has some, concatenated in sequence order (the order of the
  image tokens in ``input_ids``), and ``position_ids`` [3, 1, T] (M-RoPE's temporal, height and
  width positions, each sequence's own, given per sequence by the caller).

Every [1, T] tensor is per-token: :func:`cp_rank_share` cuts exactly those (and only those) to
this CP rank's tokens (:func:`k15_megatron.parallel.context.cp_rank_token_index`), so a field
added by a caller is split with the tokens without being named here. Each sequence is padded to
``multiple`` tokens (:func:`k15_megatron.parallel.context.sequence_multiple`), so a mix of 200-
and 100k-token sequences costs what its tokens cost, not B x the longest.

:func:`token_budget_groups` is the dynamic micro-batching rule: consecutive items (sequences, or
RL groups of sequences kept whole) fill micro-batches up to a token budget;
:func:`split_to_count` cuts them further until a given count (ranks that must run the same
number of forward passes, e.g. an expert-parallel group).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from k15_megatron.parallel.context import cp_rank_token_index, cu_seqlens, padded_length

_META_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", "num_sequences")
IMAGE_KEYS = ("pixel_values", "image_grid_thw")
"""Per-sequence image tensors, concatenated over the sequences instead of packed per token."""


def pack_sequences(sequences: Sequence[Mapping[str, torch.Tensor]], *, multiple: int = 1,
                   pad_values: Mapping[str, float] | None = None) -> dict:
    """One packed micro-batch (module docstring) from ``sequences``: each a dict of 1-D tensors
    of one length L_i >= 1 (the same keys in every sequence, ``input_ids`` among them), plus
    optionally:

    * ``position_ids`` in every sequence: [L_i] or [3, L_i] (M-RoPE), used instead of
      0, 1, ..., L_i - 1; the packed ``position_ids`` are then [1, T] or [3, 1, T];
    * ``pixel_values`` and ``image_grid_thw`` (:data:`IMAGE_KEYS`) in the sequences that have
      images: concatenated in sequence order.

    Sequence i occupies ``padded_length(L_i, multiple)`` tokens: its L_i tokens, then padding
    (``pad_values[key]``, default 0; ``position_ids`` keep counting after the sequence's largest
    position, ``sequence_ids`` are -1).

    Raises:
        ValueError: no sequences, a sequence without ``input_ids``, of length 0, with tensors
            of different lengths, with other per-token keys than the first sequence, or
            ``position_ids`` in some sequences only.
    """
    if not sequences:
        raise ValueError("pack_sequences needs at least one sequence")
    keys = [key for key in sequences[0] if key not in IMAGE_KEYS and key != "position_ids"]
    if "input_ids" not in keys:
        raise ValueError("every packed sequence needs input_ids")
    given_positions = "position_ids" in sequences[0]
    pad_values = dict(pad_values or {})
    lengths, padded = [], []
    columns: dict[str, list[torch.Tensor]] = {key: [] for key in keys + ["position_ids", "sequence_ids"]}
    images: dict[str, list[torch.Tensor]] = {key: [] for key in IMAGE_KEYS}
    for index, seq in enumerate(sequences):
        tokens = {key: value for key, value in seq.items() if key not in IMAGE_KEYS and key != "position_ids"}
        if list(tokens) != keys or ("position_ids" in seq) != given_positions:
            raise ValueError(f"sequence {index} has fields {sorted(seq)}, sequence 0 has {sorted(sequences[0])}")
        length = int(seq["input_ids"].numel())
        if length < 1 or any(int(t.numel()) != length for t in tokens.values()):
            raise ValueError(f"sequence {index}: every field needs the same length >= 1, got "
                             f"{ {k: int(t.numel()) for k, t in tokens.items()} }")
        total = padded_length(length, multiple)
        for key in keys:
            tensor = seq[key].reshape(-1)
            pad = tensor.new_full((total - length,), pad_values.get(key, 0))
            columns[key].append(torch.cat([tensor, pad]))
        columns["position_ids"].append(_positions(seq.get("position_ids"), length, total, index))
        columns["sequence_ids"].append(torch.cat([torch.full((length,), index, dtype=torch.int64),
                                                  torch.full((total - length,), -1, dtype=torch.int64)]))
        for key in IMAGE_KEYS:
            if key in seq:
                images[key].append(seq[key])
        lengths.append(length)
        padded.append(total)
    batch = {key: torch.cat(parts, dim=-1).unsqueeze(-2) for key, parts in columns.items()}
    batch.update({key: torch.cat(parts) for key, parts in images.items() if parts})
    batch.update(cu_seqlens=cu_seqlens(lengths), cu_seqlens_padded=cu_seqlens(padded), max_seqlen=max(padded),
                 num_sequences=len(sequences))
    return batch


def _positions(given: torch.Tensor | None, length: int, total: int, index: int) -> torch.Tensor:
    """Sequence ``index``'s positions padded to ``total``: ``given`` ([L] or [3, L]) then counting
    on from its largest value, or 0 .. total - 1 when none are given."""
    if given is None:
        return torch.arange(total, dtype=torch.int64)
    if given.dim() not in (1, 2) or given.shape[-1] != length:
        raise ValueError(f"sequence {index}: position_ids must be [{length}] or [3, {length}], got "
                         f"{list(given.shape)}")
    after = int(given.max()) + 1
    pad = torch.arange(after, after + total - length, dtype=torch.int64).expand(*given.shape[:-1], -1)
    return torch.cat([given.to(torch.int64), pad], dim=-1)


def next_token(values: torch.Tensor) -> torch.Tensor:
    """``values`` [L] of one sequence shifted to its next position: values[1:] then one 0 (the
    last position has no next token; its loss mask must be 0). Built before the CP split, so a
    target never crosses into another sequence or another rank's chunk."""
    return torch.cat([values[1:], values.new_zeros(1)])


def is_packed(micro_batch: Mapping) -> bool:
    """True for a micro-batch built by :func:`pack_sequences`."""
    return "cu_seqlens_padded" in micro_batch


def padded_lengths(micro_batch: Mapping) -> list[int]:
    """The padded length of each sequence of a packed micro-batch."""
    cu = micro_batch["cu_seqlens_padded"]
    return (cu[1:] - cu[:-1]).tolist()


def cp_rank_share(micro_batch: Mapping, *, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's part of a packed micro-batch: every [1, T] tensor cut to the rank's tokens
    ([1, T / CP], Megatron's load-balanced order); the ``cu_seqlens*`` / ``max_seqlen`` keep
    describing the WHOLE packed batch (Megatron's THD RoPE and CP attention divide them by CP
    themselves). Other entries are passed through. ``cp_size=1`` returns the batch unchanged.
    """
    if cp_size == 1:
        return dict(micro_batch)
    total = int(micro_batch["cu_seqlens_padded"][-1])
    index = cp_rank_token_index(padded_lengths(micro_batch), cp_size=cp_size, cp_rank=cp_rank)
    out = {}
    for key, value in micro_batch.items():
        per_token = (isinstance(value, torch.Tensor) and key not in _META_KEYS and value.dim() == 2
                     and tuple(value.shape) == (1, total))
        out[key] = value[:, index.to(value.device)] if per_token else value
    return out


def token_budget_groups(item_tokens: Sequence[int], *, max_tokens: int,
                        max_items: int | None = None) -> list[list[int]]:
    """Cut consecutive items into micro-batches of at most ``max_tokens`` tokens.

    ``item_tokens[i]``: the (padded) tokens item i takes, e.g. one sequence, or one RL group of
    k responses kept together. Items are taken in order; a micro-batch is closed when the next
    item would pass the budget, or when it already holds ``max_items`` items (no cap: None). An
    item larger than the budget alone gets its own micro-batch (it cannot be split; its memory
    is then set by its own length). Returns lists of item indices, every item exactly once, in
    order.

    Raises:
        ValueError: ``max_tokens`` or ``max_items`` < 1 or an item of fewer than 1 token.
    """
    if max_tokens < 1 or (max_items is not None and max_items < 1):
        raise ValueError(f"token budget and item cap must be >= 1, got {max_tokens} and {max_items}")
    groups: list[list[int]] = []
    used = 0
    for index, tokens in enumerate(item_tokens):
        if tokens < 1:
            raise ValueError(f"item {index} has {tokens} tokens")
        if groups and used + tokens <= max_tokens and (max_items is None or len(groups[-1]) < max_items):
            groups[-1].append(index)
            used += tokens
        else:
            groups.append([index])
            used = tokens
    return groups


def split_to_count(groups: Sequence[Sequence[int]], item_tokens: Sequence[int], count: int) -> list[list[int]]:
    """``groups`` (:func:`token_budget_groups`' micro-batches of item indices) split until there
    are ``count`` of them: each time, the micro-batch of the most tokens that holds two or more
    items is cut in two at the item boundary that best balances its tokens (the earlier boundary
    on a tie). Items stay in order and whole, so every micro-batch stays within the token budget;
    ``count`` <= len(groups) returns them unchanged.

    Raises:
        ValueError: ``count`` above the number of items (a micro-batch needs at least one).
    """
    out = [list(g) for g in groups]
    items = sum(len(g) for g in out)
    if count > items:
        raise ValueError(f"cannot run {count} micro-batches of {items} items (sequences or RL groups): "
                         "each micro-batch needs at least one")
    while len(out) < count:
        index = max((i for i, g in enumerate(out) if len(g) > 1),
                    key=lambda i: (sum(item_tokens[j] for j in out[i]), -i))
        group = out[index]
        tokens = [item_tokens[j] for j in group]
        total, before, best = sum(tokens), 0, None
        for cut in range(1, len(group)):
            before += tokens[cut - 1]
            imbalance = abs(total - 2 * before)
            if best is None or imbalance < best[0]:
                best = (imbalance, cut)
        out[index:index + 1] = [group[:best[1]], group[best[1]:]]
    return out
