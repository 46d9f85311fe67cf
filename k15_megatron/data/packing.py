"""Sequence packing for SFT: many (prompt, response) examples per row, loss on responses only.

``pack_examples`` fills rows of ``seq_length`` tokens greedily, in order, never splitting an
example (one longer than a row is an error naming it). Each row carries:

* ``input_ids`` / ``labels``: tokens and next tokens (labels of the last token of each example
  and of padding are irrelevant: the loss mask is 0 there);
* ``loss_mask``: 1 exactly where the label is a response token (the prompt and padding are not
  learned);
* ``position_ids``: restart at 0 for every example, as if each were alone;
* ``document_ids``: which example each token belongs to (-1 for padding);
* ``images``: per example of the row, in order, its ``pixel_values`` / ``image_grid_thw`` (an
  image example of :class:`~k15_megatron.data.sft_set.SftSet`) or None (a text example).

An image example's prompt already holds its expanded image tokens, so it is packed like any
other example: whole, its image tokens with its text, and its length is what the row counts.

A row fixes which examples train together (the data order is a sequence of rows). For the
forward pass :func:`row_examples` hands a row's examples out one by one, without the row's
padding; the trainer packs them back to back as separate sequences
(:mod:`k15_megatron.train.packed`), so examples never see each other and no padding beyond
what context parallelism needs is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class PackedRow:
    input_ids: List[int]
    labels: List[int]
    loss_mask: List[int]
    position_ids: List[int]
    document_ids: List[int]
    images: List[Optional[Dict[str, torch.Tensor]]] = field(default_factory=list)


def pack_examples(examples: Sequence[Tuple[List[int], List[int]]], *, seq_length: int,
                  pad_id: int, images: Optional[Sequence[Optional[Dict[str, torch.Tensor]]]] = None
                  ) -> List[PackedRow]:
    """Pack (prompt_ids, response_ids) pairs into rows of ``seq_length`` (see module docstring).
    ``images``: per example, its image tensors or None (default: all text)."""
    if images is not None and len(images) != len(examples):
        raise ValueError(f"{len(images)} image entries for {len(examples)} examples")
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
        current.images.append(images[index] if images is not None else None)
    if current.input_ids:
        rows.append(_pad(current, seq_length, pad_id))
    return rows


def _pad(row: PackedRow, seq_length: int, pad_id: int) -> PackedRow:
    n = seq_length - len(row.input_ids)
    return PackedRow(row.input_ids + [pad_id] * n, row.labels + [pad_id] * n, row.loss_mask + [0] * n,
                     row.position_ids + [0] * n, row.document_ids + [-1] * n, row.images)


def row_examples(row: PackedRow) -> List[Dict[str, torch.Tensor]]:
    """The examples of ``row`` in order, each a dict of 1-D tensors of its length: ``input_ids``
    and ``labels`` (int64), ``loss_mask`` (float32); the row's padding is dropped. An image
    example also carries its ``pixel_values`` [P, patch values] and ``image_grid_thw`` [I, 3]."""
    docs = torch.tensor(row.document_ids)
    fields = {"input_ids": torch.tensor(row.input_ids), "labels": torch.tensor(row.labels),
              "loss_mask": torch.tensor(row.loss_mask, dtype=torch.float32)}
    examples = []
    for doc in range(int(docs.max()) + 1 if len(docs) else 0):
        where = docs == doc
        example = {key: value[where] for key, value in fields.items()}
        image = row.images[doc] if doc < len(row.images) else None
        examples.append({**example, **image} if image is not None else example)
    return examples
