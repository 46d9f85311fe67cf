"""``k15 dpo CONFIG [overrides]``: direct preference optimisation on preference pairs (JSONL or Parquet).

One of the long2short methods (PAPER.md section 7). The pairs come from ``data.train_path``
(JSONL, Parquet or a ``datasets`` folder; ``data.fields`` renames columns):
``{prompt, chosen, rejected}`` records, or grouped sampled responses ``{prompt, responses,
correct}`` (what ``k15 sample`` writes to ``sample.groups_output``) whose pairs are the paper's:
chosen = the shortest correct response, rejected = every wrong response and every correct one
longer than ``dpo.ratio`` (1.5) x the chosen one (:mod:`k15_megatron.data.pairs`,
:func:`k15_megatron.rl.long2short.dpo_pairs`). Bad records are refused by file:line before any
process starts.

The reference log-probs are those of the starting weights (``model.hf_path`` or
``model.init_from``), computed once before the first step (forward only, each data-parallel
rank a share, :func:`k15_megatron.train.dpo_step.reference_logprobs`) and stored in every
checkpoint, so a resumed run (``checkpoint.resume=auto``) trains against the same reference.
Each step takes ``data.global_batch_size`` pairs (a seeded order, cycled by epochs, a pure
function of (seed, step)), ``data.micro_batch_size`` pairs per packed micro-batch (a pair's two
sequences side by side), and minimises the mean DPO loss (beta ``dpo.beta``) over them, plus
``dpo.sft_loss_weight`` x the chosen responses' negative log-likelihood per token (0 by default)
(:mod:`k15_megatron.train.dpo_step`). Logged per step: ``train/loss``, ``train/chosen_nll``,
``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``,
``train/grad_norm``, ``train/lr``. Checkpoints, resume and stop signals as ``k15 sft``: every
``checkpoint.save_interval`` steps and at the end; SIGTERM, SIGINT or SIGUSR1 finish the step,
save once and exit 0.
"""

from __future__ import annotations

import functools
import time

from k15_megatron.data.pairs import PairSet
from k15_megatron.jobs.metrics_log import MetricsLogger
from k15_megatron.jobs.sft import rows_for_step
from k15_megatron.jobs.step_loop import resume_point, run_steps


def read_pairs(cfg, tokenizer) -> PairSet:
    """The run's pairs from ``data.train_path`` (the job and its pre-start check read them so);
    grouped records paired by :func:`k15_megatron.rl.long2short.dpo_pairs` at ``dpo.ratio``.
    Raises ConfigError naming ``path:line``."""
    from k15_megatron.rl.long2short import dpo_pairs

    def group_pairs(lengths, correct):
        return dpo_pairs(lengths, correct, len(lengths), ratio=cfg.dpo.ratio)

    return PairSet.from_file(cfg.data.train_path, tokenizer, seq_length=cfg.data.seq_length, group_pairs=group_pairs,
                             too_long=cfg.data.too_long, fields=cfg.data.fields)


def _reference(trainer, pairs: PairSet, resume_state):
    """[P, 2] reference log-probs: the checkpoint's on a resume, else the starting model's."""
    from k15_megatron.train.dpo_step import reference_logprobs

    cfg = trainer.cfg
    if resume_state is not None:
        reference = resume_state["reference_logprobs"]
        if reference.shape != (len(pairs), 2):
            raise ValueError(f"the resume checkpoint's reference log-probs cover {reference.shape[0]} pairs and "
                             f"data.train_path={cfg.data.train_path} gives {len(pairs)}: resume with the run's data, "
                             "or start a new run (checkpoint.save_dir) with model.init_from")
        return reference
    begin = time.perf_counter()
    reference = reference_logprobs(trainer.chunks, pairs.pairs, vocab_size=trainer.arch.vocab_size,
                                   chunk_size=cfg.dpo.logprob_chunk_tokens,
                                   micro_batch_size=2 * cfg.data.micro_batch_size)
    trainer.log(f"dpo: reference log-probs of {len(pairs)} pairs in {time.perf_counter() - begin:.1f} s")
    return reference


def run(cfg) -> None:
    from k15_megatron.train.dpo_step import dpo_step
    from k15_megatron.train.setup import build_trainer, write_run_assets

    trainer = build_trainer(cfg)
    layout = trainer.layout
    assets = write_run_assets(trainer)
    pairs = read_pairs(cfg, trainer.tokenizer)
    trainer.log(f"dpo: {len(pairs)} pairs from {cfg.data.train_path}; weights: {trainer.init_source}; "
                f"layout {layout.describe()}")
    start, resume_state = resume_point(trainer, "dpo")
    reference = _reference(trainer, pairs, resume_state)
    logger = MetricsLogger(cfg.logging, enabled=trainer.is_logging_rank, resume_from_iteration=start)
    per_rank = cfg.data.global_batch_size // layout.dp_size
    step_fn = functools.partial(dpo_step, trainer, beta=cfg.dpo.beta, sft_loss_weight=cfg.dpo.sft_loss_weight,
                                chunk_size=cfg.dpo.logprob_chunk_tokens,
                                pairs_per_micro_batch=cfg.data.micro_batch_size)

    def step(i: int) -> None:
        begin = time.perf_counter()
        indices = rows_for_step(pairs.pairs, i, global_batch=cfg.data.global_batch_size, seed=cfg.seed)
        mine = indices[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
        metrics = step_fn([pairs.pairs[p] for p in mine], reference[mine])
        logger.log(i + 1, {**metrics, "time/iteration_s": time.perf_counter() - begin}, prefix="dpo ")

    run_steps(trainer, "dpo", start=start, step=step, logger=logger, assets_dir=assets,
              extra_state={"reference_logprobs": reference})


HELP_KEYS = ("data.train_path", "dpo.beta", "dpo.sft_loss_weight", "dpo.ratio", "data.seq_length", "data.micro_batch_size",
             "data.global_batch_size", "optim.lr", "optim.train_iters", "checkpoint.save_dir",
             "checkpoint.save_interval", "checkpoint.resume")
"""The config keys ``k15 dpo --help`` lists (besides those of every job)."""


def main(argv=None) -> int:
    from k15_megatron.jobs.launch import job_main
    from k15_megatron.jobs.preflight import job_checks

    return job_main("k15 dpo", __doc__, run, argv, help_keys=HELP_KEYS, job_errors=job_checks("dpo"),
                    run_record="dpo")
