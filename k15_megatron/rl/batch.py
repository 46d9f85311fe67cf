"""RolloutBatch: THE container for rollout results, from the replay buffer to the loss.

One typed batch for the whole pipeline (rollout -> rewards -> train): the replay buffer
assembles it from finished trajectory groups, the reward stage fills ``rewards``, the trainer
reads tokens, masks and behaviour log-probs from it. Nothing else carries rollout data.

Layout. B samples = groups * group_size, the k responses of one prompt contiguous. Every sample
is one row of length T: prompt tokens, then the response tokens (all segments of the trajectory
back to back), then padding. Per-token tensors are aligned with ``input_ids``: entry [b, t]
describes token ``input_ids[b, t]``, so ``behaviour_logprobs[b, t]`` is
log mu(input_ids[b, t] | input_ids[b, :t]); a trainer that gets logits at position t - 1 for the
token at t shifts by one (labels = input_ids[:, 1:], masks [:, 1:]).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class RolloutBatch:
    """Training samples of one iteration (see the module doc for the layout)."""

    input_ids: torch.Tensor
    """[B, T] int64: prompt + response tokens, right-padded with the pad id."""
    attention_mask: torch.Tensor
    """[B, T] bool: True on prompt and response tokens, False on padding."""
    response_mask: torch.Tensor
    """[B, T] bool: True on response tokens (every segment)."""
    loss_mask: torch.Tensor
    """[B, T] bool: response tokens that enter the loss (segment loss policy applied)."""
    behaviour_logprobs: torch.Tensor
    """[B, T] float32: log-prob the generating engine gave each response token; 0 elsewhere."""
    segment_index: torch.Tensor
    """[B, T] int32: index of the segment that produced the token; -1 off the response."""
    prompt_lengths: torch.Tensor
    """[B] int64: prompt tokens per sample."""
    response_lengths: torch.Tensor
    """[B] int64: response tokens per sample (all segments)."""
    trajectory_ids: torch.Tensor
    """[B] int64: replay-buffer trajectory id."""
    prompt_ids: torch.Tensor
    """[B] int64: index of the problem in the data set (for the sampler's success tracking)."""
    segment_iterations: torch.Tensor
    """[B, G] int64: RL iteration that generated segment g of the sample; -1 past its segments."""
    segment_policy_versions: torch.Tensor
    """[B, G] int64: policy (weights) version that generated segment g; -1 past its segments."""
    num_segments: torch.Tensor
    """[B] int64: segments per sample (G = the maximum)."""
    finish_reasons: list[str]
    """[B] why each response ended: e.g. stop, length, repeat, max_segments."""
    group_size: int
    """k: responses per prompt."""
    rewards: Optional[torch.Tensor] = None
    """[B] float32 total rewards; None until the reward stage fills them."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_groups(self) -> int:
        return self.num_samples // self.group_size

    def validate(self) -> None:
        """Raise ValueError if shapes or the group structure are inconsistent."""
        b, t = self.input_ids.shape
        for name in ("attention_mask", "response_mask", "loss_mask", "behaviour_logprobs",
                     "segment_index"):
            if tuple(getattr(self, name).shape) != (b, t):
                raise ValueError(f"RolloutBatch.{name} must be [{b}, {t}], "
                                 f"got {tuple(getattr(self, name).shape)}")
        for name in ("prompt_lengths", "response_lengths", "trajectory_ids", "prompt_ids",
                     "num_segments"):
            if tuple(getattr(self, name).shape) != (b,):
                raise ValueError(f"RolloutBatch.{name} must be [{b}]")
        g = self.segment_iterations.shape
        if len(g) != 2 or g[0] != b or self.segment_policy_versions.shape != g:
            raise ValueError("RolloutBatch.segment_iterations / segment_policy_versions must "
                             f"both be [{b}, G]")
        if len(self.finish_reasons) != b:
            raise ValueError(f"RolloutBatch.finish_reasons must have {b} entries")
        if self.group_size < 1 or b % self.group_size != 0:
            raise ValueError(f"RolloutBatch of {b} samples is not a whole number of groups "
                             f"of {self.group_size}")
        if self.rewards is not None and tuple(self.rewards.shape) != (b,):
            raise ValueError(f"RolloutBatch.rewards must be [{b}]")
        if bool((self.loss_mask & ~self.response_mask).any()):
            raise ValueError("RolloutBatch.loss_mask must be a subset of response_mask")

    def select_groups(self, group_indices: torch.Tensor) -> "RolloutBatch":
        """A new batch holding the given groups (in that order), e.g. one data-parallel shard."""
        k = self.group_size
        rows = (group_indices.long().unsqueeze(1) * k + torch.arange(k)).reshape(-1)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[rows]
            elif f.name == "finish_reasons":
                out[f.name] = [value[i] for i in rows.tolist()]
            else:
                out[f.name] = value
        return RolloutBatch(**out)

    def shard_groups(self, rank: int, world_size: int) -> "RolloutBatch":
        """Contiguous groups of this data-parallel rank; groups are never split (the baseline
        needs all k rewards of a prompt). Needs num_groups divisible by world_size."""
        if world_size < 1 or not 0 <= rank < world_size or self.num_groups % world_size:
            raise ValueError(f"cannot shard {self.num_groups} groups over {world_size} ranks "
                             f"(rank {rank})")
        per = self.num_groups // world_size
        return self.select_groups(torch.arange(rank * per, (rank + 1) * per))

    def to(self, device) -> "RolloutBatch":
        """A copy with every tensor moved to ``device``."""
        return RolloutBatch(**{f.name: (getattr(self, f.name).to(device)
                                        if isinstance(getattr(self, f.name), torch.Tensor)
                                        else getattr(self, f.name)) for f in fields(self)})
