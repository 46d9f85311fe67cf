"""The start of the jobs that only generate (``k15 eval``, ``k15 sample``, ``k15 curate``): the
model without an optimizer, its weights synced into the colocated rollout engine.

:func:`start_generation` builds this rank's model (``model.init_from`` or ``model.hf_path``),
writes the run's assets (tokenizer, config.json), then, after ``before_engine`` (the job's data
reading: its errors come before vLLM starts), creates the rollout engine and pushes the weights
in place by the same sync ``k15 rl`` uses (no export to disk), as policy version 0.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from k15_megatron.engine.weight_sync import ColocatedWeightSync
from k15_megatron.models.gpt import torch_dtype
from k15_megatron.rollout.engine import RolloutEngine
from k15_megatron.train.setup import build_trainer, engine_model_folder, write_run_assets


def start_generation(cfg, *, before_engine: Optional[Callable[[object], object]] = None
                     ) -> Tuple[object, RolloutEngine, object]:
    """``(trainer, rollout engine, before_engine(trainer) or None)``; see the module docstring."""
    trainer = build_trainer(cfg, with_optimizer=False)
    assets = write_run_assets(trainer)
    prepared = before_engine(trainer) if before_engine is not None else None
    rollout = RolloutEngine.create(cfg.rollout, model_path=engine_model_folder(trainer, assets),
                                   repeat=cfg.rl.repeat, seed=cfg.seed)
    ColocatedWeightSync(rollout.llm, dtype=torch_dtype(cfg.precision.dtype)).sync(trainer.model, trainer.arch)
    rollout.mark_weights_updated(0)
    return trainer, rollout, prepared
