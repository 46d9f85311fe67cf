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

Image prompts: the buffer stores token ids only; a prompt's images are looked up by its prompt
id (``images_of(prompt_id)`` -> the decoded images, e.g. from the data set's record) every time a
request is built, so a continued trajectory, also after a resume, is generated with the same
images as its first segment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from k15_megatron.rl.replay import SegmentReplayBuffer, Trajectory
from k15_megatron.rollout.engine import RolloutEngine, Sampling, SegmentRequest, SegmentResult
from k15_megatron.rollout.replicas import generate_everywhere

Prompt = tuple[int, torch.Tensor]
"""(prompt id in the data set, [P] int64 prompt token ids)."""
ImagesOf = Callable[[int], tuple]
"""prompt id -> the prompt's decoded images in placeholder order (() for a text prompt)."""


def expand_prompts(prompts: Sequence[torch.Tensor], *, k: int, token_budget: int,
                   max_response_tokens: int, first_trajectory_id: int = 0,
                   images: Optional[Sequence[tuple]] = None) -> list[SegmentRequest]:
    """k fresh requests per prompt (the k samples of a group, contiguous), trajectory ids
    ``first_trajectory_id`` upwards; ``images[p]``: prompt p's images (default none)."""
    if k < 1:
        raise ValueError(f"k (rl.group_size) must be >= 1, got {k}")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images must hold one tuple per prompt: {len(images)} for {len(prompts)} prompts")
    requests = []
    for p, tokens in enumerate(prompts):
        for j in range(k):
            requests.append(SegmentRequest(
                trajectory_id=first_trajectory_id + p * k + j, prompt_tokens=tokens.long(),
                response_tokens=torch.zeros(0, dtype=torch.long), token_budget=token_budget,
                max_response_tokens=max_response_tokens, images=tuple(images[p]) if images is not None else ()))
    return requests


def open_groups(buffer: SegmentReplayBuffer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Open one group of k (= buffer.group_size) empty trajectories per prompt; their ids."""
    return [buffer.add_group(prompt_id, tokens) for prompt_id, tokens in prompts]


def request_for(traj: Trajectory, *, token_budget: int, max_response_tokens: int,
                images_of: Optional[ImagesOf] = None) -> SegmentRequest:
    """The request continuing ``traj`` from its last segment (or starting it), with its prompt's
    images (``images_of(traj.prompt_id)``; None: a text prompt)."""
    images = tuple(images_of(traj.prompt_id)) if images_of is not None else ()
    return SegmentRequest(trajectory_id=traj.trajectory_id, prompt_tokens=traj.prompt_tokens,
                          response_tokens=traj.response_tokens(), token_budget=token_budget,
                          max_response_tokens=max_response_tokens, images=images)


def pending_requests(buffer: SegmentReplayBuffer, *, max_response_tokens: int,
                     images_of: Optional[ImagesOf] = None) -> list[SegmentRequest]:
    """A request for every unfinished trajectory, oldest first, under the buffer's per-iteration
    budget (rl.replay.segment_token_budget); image prompts get ``images_of(prompt_id)``."""
    budget = buffer.cfg.segment_token_budget
    return [request_for(t, token_budget=budget, max_response_tokens=max_response_tokens, images_of=images_of)
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
                      sampling: Sampling, images_of: Optional[ImagesOf] = None,
                      on_finished: Optional[Callable[[SegmentResult], None]] = None) -> IterationStats:
    """Open groups for ``prompts``, generate one segment for every unfinished trajectory
    (new and carried over) over all of ``engine``'s replicas, record them at ``iteration`` and
    the engine's policy version (collective when there are several replicas). Ready groups are
    then available from ``buffer.pop_batch``. ``images_of``: prompt id -> its images (image
    prompts; see the module docstring). ``on_finished``: called with each of this rank's
    replica's segments as it finishes, before any is recorded in ``buffer`` (``k15 rl`` scores
    finished groups there, :mod:`k15_megatron.jobs.reward_overlap`)."""
    start = time.perf_counter()
    open_groups(buffer, prompts)
    requests = pending_requests(buffer, max_response_tokens=engine.cfg.max_response_tokens, images_of=images_of)
    results = generate_everywhere(engine, requests, sampling=sampling, on_finished=on_finished)
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
