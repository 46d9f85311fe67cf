"""One ``k15 verify`` layout on this rank: start Megatron's parallel state for it, load the
Hugging Face weights, run the sequences forward, compare this rank's logits with the reference,
reduce the statistics over all ranks, and tear the parallel state down for the next layout.

A vision-language model (Qwen2-VL, Qwen2.5-VL) is built with its vision tower and gets its
images with the padded micro-batch (:mod:`k15_megatron.jobs.verify_vision`).

The reference rows reach the ranks one sequence at a time (a broadcast from rank 0, which
computed them), so a rank holds at most its own logits and one sequence's reference rows.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from k15_megatron.jobs.logit_compare import (LogitStats, compare_shard, real_vocab_columns, reduce_stats,
                                             vocab_parallel_argmax)


def verify_layout(cfg, sequences: Sequence[torch.Tensor], reference: list | None, *,
                  batch_kinds: Sequence[str], images: Sequence[dict] | None = None) -> list[tuple[str, LogitStats]]:
    """[(batch kind, reduced statistics)] of layout ``cfg``, one per kind ("packed", "padded"),
    on one model (collective over every rank).

    ``reference``: on global rank 0 the transformers logits [L_i, V] of each sequence, None on
    the other ranks. ``images``: a vision-language model's images of each sequence
    ({``pixel_values``, ``image_grid_thw``} or {}), None for a text model. Raises RuntimeError
    when the ranks together did not compare every real token exactly once per data-parallel
    replica (a layout that loses or repeats tokens).
    """
    from megatron.core import parallel_state

    from k15_megatron.config import resolve_model_arch
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.jobs.verify_vision import vision_batch
    from k15_megatron.parallel.device import collective_device
    from k15_megatron.parallel.initialize import initialize

    layout = initialize(cfg.parallel, seed=cfg.seed)
    try:
        arch, vision = resolve_model_arch(cfg.model), resolve_vision_arch(cfg.model)
        model = _load_model(cfg, arch, vision, tp_size=layout.tp_size)
        group = parallel_state.get_tensor_model_parallel_group() if layout.tp_size > 1 else None
        results = []
        for kind in batch_kinds:
            batch = (_batch(sequences, cfg.parallel, packed=kind == "packed") if vision is None
                     else vision_batch(sequences, images, vision=vision))
            shard = _megatron_shard(model, batch)
            stats = _compare(shard, sequences, reference, vocab_size=arch.vocab_size, tp_rank=layout.tp_rank,
                             group=group)
            results.append((kind, reduce_stats(stats, device=collective_device())))
    finally:
        parallel_state.destroy_model_parallel()
    expected = sum(len(s) for s in sequences) * layout.dp_size
    for kind, stats in results:
        if stats.num_tokens != expected or stats.num_values != expected * arch.vocab_size:
            raise RuntimeError(f"{kind}: compared {stats.num_tokens} tokens ({stats.num_values} logits), expected "
                               f"{expected} ({expected * arch.vocab_size}): the layout lost or repeated tokens")
    return results


def _load_model(cfg, arch, vision, *, tp_size: int):
    """This rank's part of the model of ``cfg.model.hf_path`` with its Hugging Face weights."""
    from k15_megatron.models.gpt import padded_vocab_size

    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, tp_size)
    if vision is None:
        from k15_megatron.checkpoint.model_weights import load_hf_weights
        from k15_megatron.models.gpt import build_gpt_model

        model = build_gpt_model(arch, parallel_cfg=cfg.parallel, precision_cfg=cfg.precision, padded_vocab=padded)
        load_hf_weights(model, cfg.model.hf_path, arch, padded)
        return model
    from k15_megatron.checkpoint.vl_weights import load_vl_hf_weights
    from k15_megatron.models.qwen2_vl import build_qwen2_vl_model

    model = build_qwen2_vl_model(arch, vision, parallel_cfg=cfg.parallel, precision_cfg=cfg.precision,
                                 padded_vocab=padded)
    load_vl_hf_weights(model, cfg.model.hf_path, arch, vision, padded)
    return model


def _batch(sequences, parallel, *, packed: bool) -> dict:
    from k15_megatron.jobs.verify_inputs import packed_batch, padded_batch, sequence_multiple_of

    return (packed_batch if packed else padded_batch)(sequences, multiple=sequence_multiple_of(parallel))


def _megatron_shard(model, batch: dict):
    """(logits [N, V_pad/TP], sequence_ids [N], token index [N]) of the N tokens this rank's
    output holds, on the last pipeline stage; None on the others. The token index is the
    batch's ``token_index`` (a vision-language batch, whose M-RoPE positions are not indices)
    or its ``position_ids``."""
    from k15_megatron.train.schedule import forward_backward

    def keep(mb, logits):
        kept = {"logits": logits.detach(), "sequence_ids": mb["sequence_ids"],
                "position_ids": mb.get("token_index", mb["position_ids"])}
        return logits.new_zeros(()), torch.tensor(1, dtype=torch.int, device=logits.device), kept

    model.eval()
    with torch.no_grad():
        outputs = forward_backward(model, [batch], keep, forward_only=True)
    if not outputs:
        return None
    out = outputs[0]
    return (out["logits"].reshape(-1, out["logits"].shape[-1]), out["sequence_ids"].reshape(-1),
            out["position_ids"].reshape(-1))


def _compare(shard, sequences, reference, *, vocab_size: int, tp_rank: int, group) -> LogitStats:
    """This rank's partial statistics; every rank takes part in the reference broadcasts, the
    tensor-parallel ranks of the last stage in the greedy all-reduces."""
    from k15_megatron.parallel.device import collective_device

    stats = LogitStats()
    if shard is not None:
        logits, sequence_ids, positions = shard
        vocab_start, num_real = real_vocab_columns(vocab_local=logits.shape[-1], tp_rank=tp_rank,
                                                   vocab_size=vocab_size)
        greedy = vocab_parallel_argmax(logits, vocab_start=vocab_start, num_real=num_real, group=group)
    for index, seq in enumerate(sequences):
        ref = reference[index] if reference is not None else torch.empty(len(seq), vocab_size)
        ref = ref.to(collective_device())
        dist.broadcast(ref, src=0)
        if shard is None:
            continue
        rows = (sequence_ids == index).nonzero().squeeze(1)
        ref_rows = ref[positions[rows].to(ref.device)].to(logits.device)
        stats.add(compare_shard(logits[rows], ref_rows, vocab_start=vocab_start, num_real=num_real))
        if tp_rank == 0:  # each token's greedy agreement counted once per replica
            stats.num_agree += int((greedy[rows] == ref_rows.argmax(-1)).sum())
            stats.num_tokens += int(rows.numel())
    return stats
