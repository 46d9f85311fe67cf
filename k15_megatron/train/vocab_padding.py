"""Megatron's language-model loss over the tokenizer's vocabulary, not the padded one.

Megatron pads the output layer to ``padded_vocab_size`` rows (a multiple of
``model.make_vocab_size_divisible_by`` x TP) and its cross-entropy (``labels`` passed to the
model, :func:`megatron.core.tensor_parallel.vocab_parallel_cross_entropy`) normalises over every
row, padding included. Those rows are not tokens: the HF export drops them and vLLM never
samples them. Left in, they make the trained loss differ from the exported model's loss (a
zero padding row adds exp(0) to the normaliser of every token) and they receive gradients.

:func:`real_vocab_logits` masks them out while a step runs: a forward hook on the output layer
of the chunk that holds it sets the padding columns of this TP rank's logit shard
[S, B, V_pad/TP] to the dtype's lowest finite value, in place (no copy of the logits), so their
softmax weight is exactly 0, the loss is the one over ``vocab_size`` tokens (transformers', on
the exported model) and the padding rows get exactly zero gradient. The RL paths never need it:
their log-probs already exclude the padding (:mod:`k15_megatron.rl.logprobs`).
"""

from __future__ import annotations

import contextlib

import torch

from k15_megatron.models.gpt import unwrap_model


def _padding_hook(vocab_size: int, tp_rank: int):
    def hook(module, inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        local = logits.shape[-1]
        pad_from = vocab_size - tp_rank * local
        if pad_from < local:
            logits[..., max(0, pad_from):] = torch.finfo(logits.dtype).min
        return output
    return hook


@contextlib.contextmanager
def real_vocab_logits(model_chunks, vocab_size: int):
    """Within the block, the output layer's logits ([S, B, V_pad/TP], this TP rank's vocabulary
    rows [r * V_pad/TP, (r + 1) * V_pad/TP)) have the columns of rows >= ``vocab_size`` set to
    ``finfo(dtype).min``; see the module docstring. Not to be combined with
    :func:`k15_megatron.train.logprobs.hidden_state_output`, whose output layer returns hidden
    states. Removes the hooks on exit."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    handles = []
    for chunk in (model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]):
        model = unwrap_model(chunk)
        model = getattr(model, "language_model", model)  # a vision-language model's GPTModel
        if getattr(model, "post_process", False):
            handles.append(model.output_layer.register_forward_hook(_padding_hook(vocab_size, tp_rank)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
