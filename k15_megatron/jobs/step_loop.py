"""The fixed-step training loop of ``k15 sft`` and ``k15 dpo``: resume, periodic saves, clean stops.

A job supplies one training step (``step(i)``, whatever it trains on); this module owns what
happens around it, the same for every such job: where a run with ``checkpoint.resume=auto``
restarts, a checkpoint every ``checkpoint.save_interval`` steps and at the end (model,
optimizer, the LR scheduler and the job's own ``extra_state``), and the stop signals
(:class:`~k15_megatron.jobs.preemption.PreemptionFlag`): the step in flight finishes, the run
saves once and returns.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

from k15_megatron.checkpoint import run_ckpt, run_dir
from k15_megatron.jobs.preemption import PreemptionFlag


def resume_point(trainer, job: str) -> Tuple[int, Optional[Dict[str, Any]]]:
    """(first step to run, the resumed checkpoint's run state or None). With
    ``checkpoint.resume=auto`` and a checkpoint in ``checkpoint.save_dir`` the model, optimizer
    and LR scheduler are loaded from it; ``job`` names the job in the log line."""
    cfg = trainer.cfg
    resume_from = run_ckpt.find_resume_checkpoint(cfg.checkpoint.save_dir) if cfg.checkpoint.resume == "auto" else None
    if not resume_from:
        return 0, None
    run_state, _ = run_ckpt.load_run_checkpoint(resume_from, model_chunks=trainer.chunks, optimizer=trainer.optimizer)
    trainer.scheduler.load_state_dict(run_state["scheduler"])
    trainer.log(f"{job}: resumed from {resume_from} at step {run_state['iteration']}")
    return run_state["iteration"], run_state


def run_steps(trainer, job: str, *, start: int, step: Callable[[int], None], logger, assets_dir: str,
              extra_state: Optional[Dict[str, Any]] = None) -> None:
    """Run ``step(i)`` for i in ``start`` .. ``optim.train_iters`` - 1, saving every
    ``checkpoint.save_interval`` steps and after the last; a stop signal on any rank ends the
    loop after the step in flight with one save. ``extra_state`` joins every checkpoint's run
    state (``iteration`` and ``scheduler`` are always there); ``assets_dir``: the tokenizer and
    config files saved beside it. Closes ``logger`` on return."""
    cfg = trainer.cfg
    preemption = PreemptionFlag()

    def save(done: int) -> None:
        run_dir.save_checkpoint(cfg, done, is_logging_rank=trainer.is_logging_rank, model_chunks=trainer.chunks,
                                optimizer=trainer.optimizer,
                                run_state={"iteration": done, "scheduler": trainer.scheduler.state_dict(),
                                           **(extra_state or {})},
                                rank_state={}, hf_assets_dir=assets_dir)

    for i in range(start, cfg.optim.train_iters):
        step(i)
        done = i + 1
        stop = preemption.requested()  # collective: every rank asks every step
        if stop or (cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0
                    and done < cfg.optim.train_iters):
            save(done)  # once, also when the signal comes at a periodic save
        if stop:
            trainer.log(f"{job}: signal received, saved step {done}, exiting")
            logger.close()
            return
    save(cfg.optim.train_iters)
    logger.close()
    trainer.log(f"{job}: done; wrote checkpoint {run_ckpt.iteration_dir_name(cfg.optim.train_iters)} in "
                f"{os.path.abspath(cfg.checkpoint.save_dir)}, metrics in "
                f"{os.path.abspath(cfg.logging.dir)}")
