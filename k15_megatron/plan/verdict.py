"""The smallest change that makes a plan fit, as ready dotted overrides.

Tried in this order, each alone first: more context parallelism (the next CP sizes that divide
the world with TP x PP), activation recompute (selective, then full), the distributed optimizer,
a lower ``rollout.gpu_memory_utilization`` (the highest that fits, in steps of 0.05). When no
single change fits, the same steps are accumulated in that order. ``None`` when nothing does.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator, List, Optional, Tuple

from k15_megatron.plan.budget import MemoryPlan
from k15_megatron.plan.layout import Layout

Planner = Callable[[object, Layout], MemoryPlan]
"""``planner(cfg, layout) -> MemoryPlan`` (the arch, GPU and job fixed)."""
Candidate = Tuple[List[str], object, Layout]


def _more_context(cfg, layout: Layout) -> Iterator[Candidate]:
    cp = layout.context * 2
    while layout.world % (layout.tensor * layout.pipeline * cp) == 0:
        yield ([f"parallel.context={cp}"], cfg,
               layout.replace(context=cp, data=layout.world // (layout.tensor * layout.pipeline * cp)))
        cp *= 2


def _recompute(cfg, layout: Layout) -> Iterator[Candidate]:
    order = ("none", "selective", "full")
    for mode in order[order.index(layout.recompute) + 1:]:
        yield [f"parallel.recompute={mode}"], cfg, layout.replace(recompute=mode)


def _distributed_optimizer(cfg, layout: Layout) -> Iterator[Candidate]:
    if not layout.distributed_optimizer:
        yield ["optim.use_distributed_optimizer=true"], cfg, layout.replace(distributed_optimizer=True)


def _lower_utilization(cfg, layout: Layout) -> Iterator[Candidate]:
    current = round(cfg.rollout.gpu_memory_utilization, 2)
    steps = int(round(current / 0.05))
    for i in range(steps - 1, 0, -1):
        value = round(i * 0.05, 2)
        changed = copy.deepcopy(cfg)
        changed.rollout.gpu_memory_utilization = value
        yield [f"rollout.gpu_memory_utilization={value}"], changed, layout


STEPS = (_more_context, _recompute, _distributed_optimizer, _lower_utilization)


def smallest_change(cfg, layout: Layout, planner: Planner, *, rl: bool = True) -> Optional[List[str]]:
    """The overrides of the first candidate whose plan fits (module docstring), or None."""
    steps = STEPS if rl else STEPS[:3]
    for step in steps:
        for overrides, changed_cfg, changed_layout in step(cfg, layout):
            if planner(changed_cfg, changed_layout).fits:
                return overrides
    overrides: List[str] = []
    for step in steps:  # accumulate: the strongest version of each step, then the next step
        best = None
        for candidate in step(cfg, layout):
            best = candidate
            if planner(candidate[1], candidate[2]).fits:
                return overrides + candidate[0]
        if best is not None and step is not _lower_utilization:
            overrides, cfg, layout = overrides + best[0], best[1], best[2]
    return None
