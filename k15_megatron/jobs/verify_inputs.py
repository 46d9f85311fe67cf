"""What ``k15 verify`` feeds both models: the sequences, their Megatron batch, the reference.

Sequences are random token ids (seeded; the first one ``seq_len`` tokens long, the others of
lengths drawn uniformly from [1, seq_len], so a batch mixes lengths) or the tokenised texts the
user gave. Megatron sees them as one micro-batch, either packed (:func:`pack_sequences`: back to
back, each padded only to the multiple context/sequence parallelism needs) or padded (one row per
sequence, every row padded at its end to the longest, rounded up to that multiple). Both carry
``sequence_ids`` (-1 on padding) and ``position_ids`` per token, which locate every token a
rank ends up holding in the reference.

The reference is transformers' model of the same folder in float32, one sequence at a time
(no padding, no packing: nothing it computes depends on how Megatron batches).
"""

from __future__ import annotations

from typing import Sequence

import torch

from k15_megatron.parallel.context import padded_length, sequence_multiple
from k15_megatron.train.packed import pack_sequences


def sequence_multiple_of(parallel) -> int:
    """The multiple each sequence (packed) or row (padded) is padded to under the ``parallel``
    section's layout (:func:`k15_megatron.parallel.context.sequence_multiple`)."""
    return sequence_multiple(cp_size=parallel.context, tp_size=parallel.tensor,
                             sequence_parallel=parallel.sequence_parallel)


def random_sequences(*, num_sequences: int, seq_len: int, vocab_size: int, seed: int) -> list[torch.Tensor]:
    """``num_sequences`` 1-D int64 tensors of token ids in [0, vocab_size): the first of
    ``seq_len`` tokens, the others of uniformly drawn lengths in [1, seq_len]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [seq_len] + torch.randint(1, seq_len + 1, (num_sequences - 1,), generator=generator).tolist()
    return [torch.randint(0, vocab_size, (length,), generator=generator) for length in lengths]


def text_sequences(texts: Sequence[str], tokenizer, *, seq_len: int | None) -> list[torch.Tensor]:
    """Each text's token ids (the tokenizer's own special tokens included), cut to ``seq_len``.

    Raises:
        ValueError: a text that gives no tokens.
    """
    sequences = []
    for index, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"][:seq_len]
        if not ids:
            raise ValueError(f"--text number {index + 1} ({text!r}) gives no tokens")
        sequences.append(torch.tensor(ids, dtype=torch.int64))
    return sequences


def padded_batch(sequences: Sequence[torch.Tensor], *, multiple: int) -> dict:
    """[B, S] ``input_ids`` (0 on padding), ``position_ids`` (0..S-1) and ``sequence_ids``
    (the row's index, -1 on padding); S = the longest length rounded up to ``multiple``."""
    width = padded_length(max(len(s) for s in sequences), multiple)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.int64)
    sequence_ids = torch.full((len(sequences), width), -1, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = seq
        sequence_ids[row, :len(seq)] = row
    position_ids = torch.arange(width, dtype=torch.int64).unsqueeze(0).expand(len(sequences), -1).contiguous()
    return {"input_ids": input_ids, "position_ids": position_ids, "sequence_ids": sequence_ids}


def packed_batch(sequences: Sequence[torch.Tensor], *, multiple: int) -> dict:
    """One packed micro-batch of ``sequences`` (:func:`k15_megatron.train.packed.pack_sequences`)."""
    return pack_sequences([{"input_ids": seq} for seq in sequences], multiple=multiple)


@torch.no_grad()
def reference_logits(hf_dir: str, sequences: Sequence[torch.Tensor], *, vocab_size: int) -> list[torch.Tensor]:
    """transformers' float32 logits [L_i, vocab_size] of each sequence, run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return [model(seq.unsqueeze(0)).logits[0, :, :vocab_size].float() for seq in sequences]
