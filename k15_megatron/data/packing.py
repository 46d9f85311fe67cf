"""Sequence packing for SFT: many (prompt, response) examples per row, loss on responses only.

``pack_examples`` fills rows of ``seq_length`` tokens greedily, in order, never splitting an
example (one longer than a row is an error naming it). Each row carries:

* ``input_ids`` / ``labels``: tokens and next tokens (labels of the last token of each example
  and of padding are irrelevant: the loss mask is 0 there);
* ``loss_mask``: 1 exactly where the label is a response token (the prompt and padding are not
  learned);
* ``position_ids``: restart at 0 for every example, as if each were alone;
* ``document_ids``: which example each token belongs to (-1 for padding), from which
  :func:`block_causal_mask` builds the attention mask that keeps examples from seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch


@dataclass
class PackedRow:
    input_ids: List[int]
    labels: List[int]
    loss_mask: List[int]
    position_ids: List[int]
    document_ids: List[int]


def pack_examples(examples: Sequence[Tuple[List[int], List[int]]], *, seq_length: int,
                  pad_id: int) -> List[PackedRow]:
    """Pack (prompt_ids, response_ids) pairs into rows of ``seq_length`` (see module docstring)."""
    rows: List[PackedRow] = []
    current = PackedRow([], [], [], [], [])
    for index, (prompt, response) in enumerate(examples):
        tokens = list(prompt) + list(response)
        if len(tokens) > seq_length:
            raise ValueError(f"example {index} has {len(tokens)} tokens, more than data.seq_length={seq_length}")
        if len(current.input_ids) + len(tokens) > seq_length:
            rows.append(_pad(current, seq_length, pad_id))
            current = PackedRow([], [], [], [], [])
        doc = len(set(current.document_ids))
        current.input_ids += tokens
        current.labels += tokens[1:] + [pad_id]
        # label t is token t+1: a response token exactly when t+1 >= len(prompt).
        current.loss_mask += [1 if t + 1 >= len(prompt) and t + 1 < len(tokens) else 0 for t in range(len(tokens))]
        current.position_ids += list(range(len(tokens)))
        current.document_ids += [doc] * len(tokens)
    if current.input_ids:
        rows.append(_pad(current, seq_length, pad_id))
    return rows


def _pad(row: PackedRow, seq_length: int, pad_id: int) -> PackedRow:
    n = seq_length - len(row.input_ids)
    return PackedRow(row.input_ids + [pad_id] * n, row.labels + [pad_id] * n, row.loss_mask + [0] * n,
                     row.position_ids + [0] * n, row.document_ids + [-1] * n)


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool attention mask, True where attention is NOT allowed: a token sees only
    earlier tokens of its own example (Megatron's convention: masked positions are True)."""
    same_doc = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    allowed = same_doc & causal
    # Padding rows attend to themselves only, so their softmax stays finite.
    allowed |= torch.eye(seq, dtype=torch.bool, device=document_ids.device)
    return (~allowed).unsqueeze(1)


def rows_to_micro_batches(rows: Sequence[PackedRow], micro_batch_size: int) -> List[dict]:
    """Group rows into micro-batch dicts for :func:`k15_megatron.train.schedule.forward_backward`
    (host tensors: the schedule moves each micro-batch to the compute device when it runs it)."""
    batches = []
    for start in range(0, len(rows) - micro_batch_size + 1, micro_batch_size):
        chunk = rows[start:start + micro_batch_size]
        docs = torch.tensor([r.document_ids for r in chunk])
        batches.append({
            "input_ids": torch.tensor([r.input_ids for r in chunk]),
            "labels": torch.tensor([r.labels for r in chunk]),
            "loss_mask": torch.tensor([r.loss_mask for r in chunk], dtype=torch.float32),
            "position_ids": torch.tensor([r.position_ids for r in chunk]),
            "attention_mask": block_causal_mask(docs),
        })
    return batches
