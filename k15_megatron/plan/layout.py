"""The layout a memory plan is made for: parallel sizes, numeric formats, recompute.

:func:`layout_from_config` reads it from a validated config and a world size; the planner's
other modules take a :class:`Layout` (and the config sections they need), never the root.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per element of each ``precision.dtype``."""
ROLLOUT_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
"""Bytes per element of each explicit ``rollout.dtype``."""


@dataclass(frozen=True)
class Layout:
    """One training layout (Megatron-Core semantics: world = TP x PP x CP x DP; the experts of a
    mixture-of-experts model are split over EP ranks carved from DP x CP, keeping TP as their
    expert tensor-parallel size)."""

    tensor: int
    pipeline: int
    context: int
    data: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str
    """none | selective | full (``parallel.recompute``)."""
    dtype: str
    """bf16 | fp16 | fp32 (``precision.dtype``)."""
    grad_reduce_in_fp32: bool
    optimizer: str
    """adam | sgd."""
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    expert: int = 1
    """Expert-parallel size (``parallel.expert``)."""

    @property
    def world(self) -> int:
        return self.tensor * self.pipeline * self.context * self.data

    @property
    def expert_data(self) -> int:
        """Ranks holding the same experts (Megatron's expert data-parallel group): DP x CP / EP."""
        return self.data * self.context // self.expert

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def replace(self, **changes) -> "Layout":
        return dataclasses.replace(self, **changes)


def layout_from_config(cfg, *, world_size: int) -> Layout:
    """The :class:`Layout` of ``cfg`` (an ExperimentConfig) on ``world_size`` processes.

    Raises ValueError naming the keys when TP x PP x CP does not divide the world size."""
    par = cfg.parallel
    model_parallel = par.tensor * par.pipeline * par.context
    if world_size % model_parallel:
        raise ValueError(f"parallel.tensor={par.tensor} x parallel.pipeline={par.pipeline} x "
                         f"parallel.context={par.context} = {model_parallel} does not divide the "
                         f"world size {world_size}")
    return Layout(tensor=par.tensor, pipeline=par.pipeline, context=par.context,
                  data=world_size // model_parallel, sequence_parallel=par.sequence_parallel,
                  distributed_optimizer=cfg.optim.use_distributed_optimizer,
                  recompute=par.recompute, dtype=cfg.precision.dtype,
                  grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
                  optimizer=cfg.optim.optimizer,
                  first_stage_layers=par.pipeline_first_stage_layers,
                  last_stage_layers=par.pipeline_last_stage_layers, expert=par.expert)
