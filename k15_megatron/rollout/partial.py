"""Partial rollouts end to end: requests from the segment replay buffer, results back into it.

The replay buffer (:mod:`k15_megatron.rl.replay`) owns trajectories and their segments; the
engine (:mod:`k15_megatron.rollout.engine`) generates segments. This module is the glue of
one rollout iteration (PAPER.md section 4):

    open_groups(buffer, prompts)                   # k empty trajectories per new prompt
    requests = pending_requests(buffer, max_response_tokens=...)   # every unfinished one
    results = generate_everywhere(engine, requests, sampling=...)  # all replicas
    record_results(buffer, results, iteration=i, policy_version=engine.policy_version)

``rollout_iteration`` does exactly that, and is the one implementation of it (``k15 rl`` and
the partial-rollout benchmark call it). Unfinished trajectories (finish reason 'budget') stay
in the buffer and are continued from where they stopped in the next iteration, with the
policy of that iteration; each segment records its iteration and policy version.

``expand_prompts`` is the same request construction without a buffer (evaluation, benchmarks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from k15_megatron.rl.replay import SegmentReplayBuffer, Trajectory
from k15_megatron.rollout.engine import RolloutEngine, Sampling, SegmentRequest, SegmentResult
from k15_megatron.rollout.replicas import generate_everywhere

Prompt = tuple[int, torch.Tensor]
"""(prompt id in the data set, [P] int64 prompt token ids)."""


def expand_prompts(prompts: Sequence[torch.Tensor], *, k: int, token_budget: int,
                   max_response_tokens: int, first_trajectory_id: int = 0) -> list[SegmentRequest]:
    """k fresh requests per prompt (the k samples of a group, contiguous), trajectory ids
    ``first_trajectory_id`` upwards."""
    if k < 1:
        raise ValueError(f"k (rl.group_size) must be >= 1, got {k}")
    requests = []
    for p, tokens in enumerate(prompts):
        for j in range(k):
            requests.append(SegmentRequest(
                trajectory_id=first_trajectory_id + p * k + j, prompt_tokens=tokens.long(),
                response_tokens=torch.zeros(0, dtype=torch.long), token_budget=token_budget,
                max_response_tokens=max_response_tokens))
    return requests


def open_groups(buffer: SegmentReplayBuffer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Open one group of k (= buffer.group_size) empty trajectories per prompt; their ids."""
    return [buffer.add_group(prompt_id, tokens) for prompt_id, tokens in prompts]


def request_for(traj: Trajectory, *, token_budget: int, max_response_tokens: int) -> SegmentRequest:
    """The request continuing ``traj`` from its last segment (or starting it)."""
    return SegmentRequest(trajectory_id=traj.trajectory_id, prompt_tokens=traj.prompt_tokens,
                          response_tokens=traj.response_tokens(), token_budget=token_budget,
                          max_response_tokens=max_response_tokens)


def pending_requests(buffer: SegmentReplayBuffer, *,
                     max_response_tokens: int) -> list[SegmentRequest]:
    """A request for every unfinished trajectory, oldest first, under the buffer's per-iteration
    budget (rl.replay.segment_token_budget)."""
    budget = buffer.cfg.segment_token_budget
    return [request_for(t, token_budget=budget, max_response_tokens=max_response_tokens)
            for t in buffer.unfinished()]


def record_results(buffer: SegmentReplayBuffer, results: Sequence[SegmentResult], *,
                   iteration: int, policy_version: int) -> None:
    """Append each result as a segment; 'budget' leaves the trajectory open for a later call."""
    for res in results:
        buffer.add_segment(res.trajectory_id, res.tokens, res.logprobs, iteration=iteration,
                           policy_version=policy_version,
                           finish_reason=None if res.finish_reason == "budget" else
                           res.finish_reason)


@dataclass(frozen=True)
class IterationStats:
    """What one rollout iteration did."""

    num_requests: int
    """Segments generated (new + continued trajectories)."""
    num_continued: int
    """Of those, trajectories that already had segments."""
    generated_tokens: int
    """Tokens the engine produced, including those a repeat cut dropped (the compute spent)."""
    decoding_steps: int
    """The longest segment's generated tokens: all requests decode together, so this many
    decoding steps (a load-independent measure of the iteration's length)."""
    num_finished: int
    """Trajectories that finished in this iteration."""
    num_unfinished: int
    """Trajectories left open in the buffer afterwards (continued next iteration)."""
    policy_version: int
    """The weights version the segments were generated with (and are tagged with)."""
    seconds: float
    """Wall time of the iteration."""

    def metrics(self) -> dict:
        """The ``rollout/...`` metrics of ``k15 rl`` (floats; tokens/s over the wall time)."""
        return {"time/rollout_s": self.seconds,
                "throughput/rollout_tokens_per_s": self.generated_tokens / max(self.seconds, 1e-9),
                "rollout/generated_tokens": float(self.generated_tokens),
                "rollout/segments": float(self.num_requests),
                "rollout/continued": float(self.num_continued),
                "rollout/unfinished_after": float(self.num_unfinished),
                "rollout/policy_version": float(self.policy_version)}


def rollout_iteration(engine: RolloutEngine, buffer: SegmentReplayBuffer,
                      prompts: Sequence[Prompt], *, iteration: int,
                      sampling: Sampling) -> IterationStats:
    """Open groups for ``prompts``, generate one segment for every unfinished trajectory
    (new and carried over) over all of ``engine``'s replicas, record them at ``iteration`` and
    the engine's policy version (collective when there are several replicas). Ready groups are
    then available from ``buffer.pop_batch``."""
    start = time.perf_counter()
    open_groups(buffer, prompts)
    requests = pending_requests(buffer, max_response_tokens=engine.cfg.max_response_tokens)
    results = generate_everywhere(engine, requests, sampling=sampling)
    record_results(buffer, results, iteration=iteration, policy_version=engine.policy_version)
    return IterationStats(
        num_requests=len(requests),
        num_continued=sum(r.response_tokens.numel() > 0 for r in requests),
        generated_tokens=sum(r.generated_tokens for r in results),
        decoding_steps=max((r.generated_tokens for r in results), default=0),
        num_finished=sum(r.finished for r in results),
        num_unfinished=len(buffer.unfinished()),
        policy_version=engine.policy_version,
        seconds=time.perf_counter() - start)
