"""``k15 sft CONFIG [overrides]``: supervised fine-tuning on (prompt, response) records (JSONL or Parquet).

A vision-language model (Qwen2-VL, Qwen2.5-VL) trains on records with images and text records
mixed (:mod:`k15_megatron.data.images`): each image example is one packed sequence holding its
expanded image tokens, its pixels and its own M-RoPE positions (:func:`sft_micro_batches`).

The long-CoT warm-up stage before RL (PAPER.md section 8). Examples are formatted as chat turns
(:mod:`k15_megatron.data.formatting`), packed into rows of ``data.seq_length`` tokens with the
loss on response tokens only (:mod:`k15_megatron.data.packing`), and trained with Megatron for
``optim.train_iters`` steps of ``data.global_batch_size`` rows. The examples of
``data.micro_batch_size`` rows form one packed (THD) micro-batch (:func:`sft_micro_batches`):
each example its own sequence, so examples never attend to each other, split per
context-parallel rank by the schedule; the step's loss is the mean over all its response
tokens (:func:`k15_megatron.train.step.masked_token_loss`), its cross-entropy over the tokenizer's
vocabulary (the output layer's padding rows masked out, :mod:`k15_megatron.train.vocab_padding`),
so the logged loss is the exported model's. The data order is a pure function of
(seed, step), so a resumed run (``checkpoint.resume=auto``) continues exactly. Checkpoints every
``checkpoint.save_interval`` steps and at the end; SIGTERM, SIGINT or SIGUSR1 (to the ``k15``
process, its process group, torchrun or every rank) finish the step, save once and exit 0.
"""

from __future__ import annotations

import random
import time

from k15_megatron.config.model_arch import resolve_vision_arch
from k15_megatron.data.packing import pack_examples, row_examples
from k15_megatron.data.sft_set import SftSet
from k15_megatron.jobs.metrics_log import MetricsLogger
from k15_megatron.jobs.preflight import sft_processor
from k15_megatron.jobs.step_loop import resume_point, run_steps
from k15_megatron.train.moe_metrics import RoutingMetrics
from k15_megatron.train.packed import pack_sequences
from k15_megatron.train.schedule import packing_multiple
from k15_megatron.train.setup import build_trainer, write_run_assets
from k15_megatron.train.step import train_step
from k15_megatron.train.vocab_padding import real_vocab_logits


def packed_rows(cfg, tokenizer, path: str, *, processor=None):
    """All SFT rows of ``path``, packed (same on every rank); examples longer than
    ``data.seq_length`` follow ``data.too_long`` (:class:`SftSet`; the pre-start check,
    :mod:`k15_megatron.jobs.preflight`, printed any drop). ``processor``: a vision-language
    model's (:func:`k15_megatron.jobs.preflight.sft_processor`), for image records."""
    examples = SftSet.from_jsonl(path, tokenizer, seq_length=cfg.data.seq_length, too_long=cfg.data.too_long,
                                 processor=processor, fields=cfg.data.fields)
    return pack_examples(examples.examples, seq_length=cfg.data.seq_length, pad_id=tokenizer.pad_token_id or 0,
                         images=examples.images or None)


def sft_micro_batches(rows, *, micro_batch_size: int, multiple: int, vision=None) -> list[dict]:
    """One packed micro-batch (:func:`k15_megatron.train.packed.pack_sequences`) per
    ``micro_batch_size`` consecutive rows: the rows' examples back to back, each its own
    sequence padded to ``multiple`` tokens (:func:`k15_megatron.train.schedule.packing_multiple`),
    with per-token ``input_ids``, ``labels`` and ``loss_mask`` (0 on padding). Rows past the last
    whole micro-batch are not used (the step's rows are a multiple of it).

    ``vision``: a vision-language model's VisionArch; then every example also carries its own
    M-RoPE positions (:func:`k15_megatron.models.qwen2_vl.sequence_mrope_positions`, text
    examples included) and an image example its ``pixel_values`` / ``image_grid_thw``, which the
    micro-batch concatenates in example order."""
    batches = []
    for start in range(0, len(rows) - micro_batch_size + 1, micro_batch_size):
        examples = [example for row in rows[start:start + micro_batch_size] for example in row_examples(row)]
        if vision is not None:
            from k15_megatron.models.qwen2_vl import sequence_mrope_positions

            examples = [{**ex, "position_ids": sequence_mrope_positions(ex["input_ids"], ex.get("image_grid_thw"),
                                                                        vision_arch=vision)} for ex in examples]
        batches.append(pack_sequences(examples, multiple=multiple))
    return batches


def rows_for_step(rows, step: int, *, global_batch: int, seed: int):
    """The ``global_batch`` row indices of ``step``: epochs of seeded permutations, cycled."""
    per_epoch = len(rows)
    indices = []
    position = step * global_batch
    while len(indices) < global_batch:
        epoch, offset = divmod(position, per_epoch)
        order = list(range(per_epoch))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = min(global_batch - len(indices), per_epoch - offset)
        indices += order[offset:offset + take]
        position += take
    return indices


def run(cfg) -> None:
    trainer = build_trainer(cfg)
    layout = trainer.layout
    if not cfg.data.train_path:
        raise ValueError("k15 sft needs data.train_path (a JSONL of {prompt, response} records)")
    assets = write_run_assets(trainer)
    vision = resolve_vision_arch(cfg.model)
    rows = packed_rows(cfg, trainer.tokenizer, cfg.data.train_path, processor=sft_processor(cfg))
    trainer.log(f"sft: {len(rows)} packed rows of {cfg.data.seq_length} tokens from {cfg.data.train_path}; "
                f"weights: {trainer.init_source}; layout {layout.describe()}")
    start, _ = resume_point(trainer, "sft")
    logger = MetricsLogger(cfg.logging, enabled=trainer.is_logging_rank, resume_from_iteration=start)
    per_rank = cfg.data.global_batch_size // layout.dp_size
    multiple = packing_multiple(trainer.chunks)

    def step(i: int) -> None:
        begin = time.perf_counter()
        indices = rows_for_step(rows, i, global_batch=cfg.data.global_batch_size, seed=cfg.seed)
        mine = [rows[r] for r in indices[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]]
        with RoutingMetrics(trainer.chunks) as routing, real_vocab_logits(trainer.chunks, trainer.arch.vocab_size):
            metrics = train_step(trainer.chunks, trainer.optimizer, trainer.scheduler,
                                 sft_micro_batches(mine, micro_batch_size=cfg.data.micro_batch_size,
                                                   multiple=multiple, vision=vision))
        elapsed = time.perf_counter() - begin
        # The step's example tokens (all DP ranks): the rows' padding is never computed.
        tokens = sum(len(rows[r].document_ids) - rows[r].document_ids.count(-1) for r in indices)
        logger.log(i + 1, {"train/loss": metrics["loss"], "train/grad_norm": metrics["grad_norm"],
                           "train/lr": metrics["lr"], "time/iteration_s": elapsed,
                           "throughput/train_tokens_per_s": tokens / elapsed, **routing.global_metrics()},
                   prefix="sft ")

    run_steps(trainer, "sft", start=start, step=step, logger=logger, assets_dir=assets)


HELP_KEYS = ("data.train_path", "data.seq_length", "data.micro_batch_size", "data.global_batch_size", "optim.lr",
             "optim.train_iters", "checkpoint.save_dir", "checkpoint.save_interval", "checkpoint.resume",
             "checkpoint.keep_last")
"""The config keys ``k15 sft --help`` lists (besides those of every job)."""


def main(argv=None) -> int:
    from k15_megatron.jobs.launch import job_main

    from k15_megatron.jobs.preflight import job_checks

    return job_main("k15 sft", __doc__, run, argv, help_keys=HELP_KEYS, job_errors=job_checks("sft"),
                    run_record="sft")
