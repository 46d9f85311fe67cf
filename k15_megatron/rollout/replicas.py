"""Generation across all rollout-engine replicas, with every rank receiving every result.

With ``rollout.tensor_parallel_size`` smaller than the world size there are several vLLM
replicas (one per group of TP ranks). ``generate_everywhere`` deals the requests out strided
(so long and short requests spread evenly), lets each replica generate its share, and
all-gathers the results so that the replay buffer, the rewards and the trainer see the same
rollouts on every rank. Results come back in request order.
"""

from __future__ import annotations

from typing import Sequence

import torch


def generate_everywhere(engine, requests: Sequence, *, sampling, on_finished=None) -> list:
    """``engine.generate`` (a :class:`~k15_megatron.rollout.engine.RolloutEngine`) over all
    replicas: one ``SegmentResult`` per request, in request order, on every rank (collective
    when there are several replicas; raises RuntimeError if a result went missing).
    ``on_finished`` sees this rank's replica's results as they finish (``engine.generate``);
    the other replicas' arrive with the return value only."""
    layout = engine.layout
    replicas = layout.data_parallel_size
    if replicas == 1:
        return engine.generate(list(requests), sampling=sampling, on_finished=on_finished)
    mine = list(requests)[layout.data_parallel_rank::replicas]
    results = engine.generate(mine, sampling=sampling, on_finished=on_finished)
    # Ranks of one replica hold identical results; the replica's first rank contributes them.
    contribution = results if layout.rank % layout.tensor_parallel_size == 0 else None
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, contribution)
    by_id = {}
    for part in gathered:
        for result in part or ():
            by_id[result.trajectory_id] = result
    missing = [r.trajectory_id for r in requests if r.trajectory_id not in by_id]
    if missing:
        raise RuntimeError(f"generation lost trajectories {missing[:5]} across replicas")
    return [by_id[r.trajectory_id] for r in requests]
