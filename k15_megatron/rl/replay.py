"""Segment replay buffer for partial rollouts (PAPER.md section 4).

Every response is a trajectory: a chain of segments, each generated in one iteration under a
per-iteration output-token budget (``rl.replay.segment_token_budget``) and recorded with its
tokens, behaviour log-probs, iteration and policy version. A trajectory that hits the budget
stays in the buffer unfinished and is continued from where it stopped in a later iteration;
earlier segments are never re-rolled. All rollouts go through the buffer (without partial
rollouts every trajectory simply finishes in its first segment), so there is one path.

Flow per iteration i:
  ids = buf.add_group(prompt_id, prompt_tokens)        # k new, empty trajectories
  for traj in buf.unfinished(): generate up to the budget from traj.prompt + traj.response,
      buf.add_segment(traj.trajectory_id, tokens, logprobs, iteration=i, policy_version=v,
                      finish_reason=None if it hit the budget else "stop" / "length" / ...)
  batch = buf.pop_batch(iteration=i)                   # only groups whose k members finished

Segment loss policy (``rl.replay.segment_loss_policy``), realised as ``RolloutBatch.loss_mask``:
``all`` every segment; ``latest`` only the trajectory's last segment; ``recent`` segments whose
age (current iteration - segment iteration) is at most ``max_segment_age``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from k15_megatron.config.rl import SEGMENT_LOSS_POLICIES, ReplayConfig
from k15_megatron.rl.batch import RolloutBatch

MAX_SEGMENTS_REASON = "max_segments"


@dataclass
class Segment:
    """Tokens one iteration generated for a trajectory."""

    tokens: torch.Tensor
    """[n] int64 generated token ids."""
    logprobs: torch.Tensor
    """[n] float32 behaviour log-probs of those tokens."""
    iteration: int
    """RL iteration that generated the segment."""
    policy_version: int
    """Weights version the rollout engine held."""


@dataclass
class Trajectory:
    """One response in progress or finished; ``finish_reason`` is None while unfinished."""

    trajectory_id: int
    prompt_id: int
    group_id: int
    prompt_tokens: torch.Tensor
    segments: list[Segment] = field(default_factory=list)
    finish_reason: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def response_tokens(self) -> torch.Tensor:
        """[R] int64, all segments back to back (what a continuation resumes from)."""
        if not self.segments:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([s.tokens for s in self.segments])

    @property
    def num_response_tokens(self) -> int:
        return sum(s.tokens.numel() for s in self.segments)


def segment_loss_mask(segment_iterations: list[int], segment_lengths: list[int], *, policy: str,
                      iteration: int, max_age: int = 0) -> torch.Tensor:
    """[sum(segment_lengths)] bool: which response tokens enter the loss under ``policy``."""
    if policy not in SEGMENT_LOSS_POLICIES:
        raise ValueError(f"rl.replay.segment_loss_policy must be one of {SEGMENT_LOSS_POLICIES}, "
                         f"got {policy!r}")
    last = len(segment_iterations) - 1
    keep = []
    for g, it in enumerate(segment_iterations):
        if policy == "all":
            keep.append(True)
        elif policy == "latest":
            keep.append(g == last)
        else:
            keep.append(iteration - it <= max_age)
    return torch.repeat_interleave(torch.tensor(keep, dtype=torch.bool),
                                   torch.tensor(segment_lengths, dtype=torch.long))


class SegmentReplayBuffer:
    """Trajectories (finished and unfinished) grouped k per prompt; see the module doc."""

    def __init__(self, cfg: ReplayConfig, *, group_size: int):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if cfg.segment_loss_policy not in SEGMENT_LOSS_POLICIES:
            raise ValueError(f"rl.replay.segment_loss_policy must be one of "
                             f"{SEGMENT_LOSS_POLICIES}, got {cfg.segment_loss_policy!r}")
        self.cfg = cfg
        self.group_size = group_size
        self._trajectories: dict[int, Trajectory] = {}
        self._next_trajectory_id = 0
        self._next_group_id = 0

    def __len__(self) -> int:
        return len(self._trajectories)

    def add_group(self, prompt_id: int, prompt_tokens: torch.Tensor) -> list[int]:
        """Open k empty (unfinished) trajectories for one prompt; returns their ids."""
        if prompt_tokens.dim() != 1:
            raise ValueError(f"prompt_tokens must be 1-D, got {tuple(prompt_tokens.shape)}")
        gid = self._next_group_id
        self._next_group_id += 1
        ids = []
        for _ in range(self.group_size):
            tid = self._next_trajectory_id
            self._next_trajectory_id += 1
            self._trajectories[tid] = Trajectory(tid, int(prompt_id), gid,
                                                 prompt_tokens.detach().long().clone())
            ids.append(tid)
        return ids

    def add_segment(self, trajectory_id: int, tokens: torch.Tensor, logprobs: torch.Tensor, *,
                    iteration: int, policy_version: int,
                    finish_reason: Optional[str] = None) -> Trajectory:
        """Append one generated segment; ``finish_reason`` None = it stopped at the budget and
        will be continued. A trajectory reaching ``max_segments`` unfinished is closed with
        reason 'max_segments'."""
        traj = self._trajectories.get(trajectory_id)
        if traj is None or traj.finished:
            raise ValueError(f"trajectory {trajectory_id} is not an unfinished trajectory")
        if tokens.dim() != 1 or logprobs.shape != tokens.shape:
            raise ValueError(f"trajectory {trajectory_id}: tokens {tuple(tokens.shape)} and "
                             f"logprobs {tuple(logprobs.shape)} must be 1-D of equal length")
        if tokens.numel() > self.cfg.segment_token_budget:
            raise ValueError(f"trajectory {trajectory_id}: segment of {tokens.numel()} tokens "
                             f"exceeds rl.replay.segment_token_budget="
                             f"{self.cfg.segment_token_budget}")
        if finish_reason is None and tokens.numel() == 0:
            raise ValueError(f"trajectory {trajectory_id}: an empty segment must finish it")
        closes = self.segment_closes(trajectory_id, finish_reason)
        traj.segments.append(Segment(tokens.detach().long().clone(),
                                     logprobs.detach().float().clone(),
                                     int(iteration), int(policy_version)))
        if finish_reason is None and closes:
            finish_reason = MAX_SEGMENTS_REASON
        traj.finish_reason = finish_reason
        return traj

    def segment_closes(self, trajectory_id: int, finish_reason: Optional[str]) -> bool:
        """Whether adding a segment with ``finish_reason`` (None: stopped at the budget) to the
        unfinished trajectory would finish it: a finish reason, or its ``max_segments``-th segment."""
        return finish_reason is not None or len(self._trajectories[trajectory_id].segments) + 1 >= \
            self.cfg.max_segments

    def trajectory(self, trajectory_id: int) -> Trajectory:
        """The trajectory with this id (KeyError if popped or unknown). Do not mutate it."""
        return self._trajectories[trajectory_id]

    def group_of(self, trajectory_id: int) -> list[Trajectory]:
        """The k trajectories of ``trajectory_id``'s group, by id. Do not mutate them."""
        group = self._trajectories[trajectory_id].group_id
        near = range(trajectory_id - self.group_size + 1, trajectory_id + self.group_size)  # add_group's ids
        return [self._trajectories[i] for i in near
                if i in self._trajectories and self._trajectories[i].group_id == group]

    def unfinished(self) -> list[Trajectory]:
        """Trajectories to (continue to) generate, oldest first. Do not mutate them."""
        return [t for t in self._sorted() if not t.finished]

    def ready_groups(self) -> list[int]:
        """Group ids whose k trajectories are all finished, oldest first."""
        state: dict[int, bool] = {}
        for t in self._sorted():
            state[t.group_id] = state.get(t.group_id, True) and t.finished
        return [g for g, ready in state.items() if ready]

    def pop_batch(self, *, iteration: int, max_groups: Optional[int] = None,
                  pad_token_id: int = 0) -> Optional[RolloutBatch]:
        """Remove up to ``max_groups`` ready groups (oldest first) and return them as a
        RolloutBatch with the segment loss policy applied at ``iteration``; None if none."""
        groups = self.ready_groups()[:max_groups]
        if not groups:
            return None
        chosen = set(groups)
        trajs = [t for t in self._sorted() if t.group_id in chosen]
        trajs.sort(key=lambda t: (groups.index(t.group_id), t.trajectory_id))
        for t in trajs:
            del self._trajectories[t.trajectory_id]
        return self._collate(trajs, iteration=iteration, pad_token_id=pad_token_id)

    def _sorted(self) -> list[Trajectory]:
        return [self._trajectories[k] for k in sorted(self._trajectories)]

    def _collate(self, trajs: list[Trajectory], *, iteration: int,
                 pad_token_id: int) -> RolloutBatch:
        b = len(trajs)
        total = max(t.prompt_tokens.numel() + t.num_response_tokens for t in trajs)
        num_seg = max(len(t.segments) for t in trajs)
        input_ids = torch.full((b, total), pad_token_id, dtype=torch.long)
        attention = torch.zeros(b, total, dtype=torch.bool)
        response = torch.zeros(b, total, dtype=torch.bool)
        loss = torch.zeros(b, total, dtype=torch.bool)
        logprobs = torch.zeros(b, total, dtype=torch.float32)
        seg_index = torch.full((b, total), -1, dtype=torch.int32)
        seg_iter = torch.full((b, num_seg), -1, dtype=torch.long)
        seg_version = torch.full((b, num_seg), -1, dtype=torch.long)
        for row, t in enumerate(trajs):
            p, r = t.prompt_tokens.numel(), t.num_response_tokens
            lengths = [s.tokens.numel() for s in t.segments]
            iters = [s.iteration for s in t.segments]
            input_ids[row, :p] = t.prompt_tokens
            input_ids[row, p:p + r] = t.response_tokens()
            attention[row, :p + r] = True
            response[row, p:p + r] = True
            loss[row, p:p + r] = segment_loss_mask(
                iters, lengths, policy=self.cfg.segment_loss_policy, iteration=iteration,
                max_age=self.cfg.max_segment_age)
            if t.segments:
                logprobs[row, p:p + r] = torch.cat([s.logprobs for s in t.segments])
            seg_index[row, p:p + r] = torch.repeat_interleave(
                torch.arange(len(lengths), dtype=torch.int32),
                torch.tensor(lengths, dtype=torch.long))
            seg_iter[row, :len(iters)] = torch.tensor(iters, dtype=torch.long)
            seg_version[row, :len(iters)] = torch.tensor(
                [s.policy_version for s in t.segments], dtype=torch.long)
        return RolloutBatch(
            input_ids=input_ids, attention_mask=attention, response_mask=response,
            loss_mask=loss, behaviour_logprobs=logprobs, segment_index=seg_index,
            prompt_lengths=torch.tensor([t.prompt_tokens.numel() for t in trajs]),
            response_lengths=torch.tensor([t.num_response_tokens for t in trajs]),
            trajectory_ids=torch.tensor([t.trajectory_id for t in trajs]),
            prompt_ids=torch.tensor([t.prompt_id for t in trajs]),
            segment_iterations=seg_iter, segment_policy_versions=seg_version,
            num_segments=torch.tensor([len(t.segments) for t in trajs]),
            finish_reasons=[t.finish_reason for t in trajs], group_size=self.group_size)

    # ---- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain ints, strings, lists and tensors (torch.save(weights_only=True) safe)."""
        return {
            "group_size": self.group_size,
            "next_trajectory_id": self._next_trajectory_id,
            "next_group_id": self._next_group_id,
            "trajectories": [{
                "trajectory_id": t.trajectory_id, "prompt_id": t.prompt_id,
                "group_id": t.group_id, "prompt_tokens": t.prompt_tokens.clone(),
                "finish_reason": t.finish_reason,
                "segments": [{"tokens": s.tokens.clone(), "logprobs": s.logprobs.clone(),
                              "iteration": s.iteration, "policy_version": s.policy_version}
                             for s in t.segments],
            } for t in self._sorted()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with ``state_dict()`` output; group_size must match."""
        if int(state["group_size"]) != self.group_size:
            raise ValueError(f"replay checkpoint has group_size {state['group_size']}, "
                             f"rl.group_size is {self.group_size}")
        self._next_trajectory_id = int(state["next_trajectory_id"])
        self._next_group_id = int(state["next_group_id"])
        self._trajectories = {}
        for d in state["trajectories"]:
            segs = [Segment(s["tokens"].clone(), s["logprobs"].clone(), int(s["iteration"]),
                            int(s["policy_version"])) for s in d["segments"]]
            self._trajectories[int(d["trajectory_id"])] = Trajectory(
                int(d["trajectory_id"]), int(d["prompt_id"]), int(d["group_id"]),
                d["prompt_tokens"].clone(), segs, d["finish_reason"])
