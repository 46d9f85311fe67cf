"""What one `k15 rl` iteration trains on, from the real SegmentReplayBuffer.

``RLJob.pop_ready_groups`` takes the largest multiple of DP x rl.updates_per_iteration of the
finished groups, whatever rl.groups_per_micro_batch (a memory bound only), and logs
``rollout/groups_ready``, ``rollout/groups_open`` and ``train/groups`` every iteration; an
iteration with too few finished groups (partial rollouts) says in one line why it trains nothing.
The job object holds only what the method reads (config, layout, tokenizer, buffer, log).
"""

from __future__ import annotations

import types

import torch

from k15_megatron.config.rl import RLConfig
from k15_megatron.jobs.rl import RLJob
from k15_megatron.rl.replay import SegmentReplayBuffer

K = 2


def _job(*, dp: int, updates: int, groups_per_micro_batch: int):
    cfg = RLConfig(group_size=K, updates_per_iteration=updates, groups_per_micro_batch=groups_per_micro_batch)
    cfg.replay.segment_token_budget = 4
    lines = []
    trainer = types.SimpleNamespace(layout=types.SimpleNamespace(dp_size=dp),
                                    tokenizer=types.SimpleNamespace(pad_token_id=0), log=lines.append)
    job = types.SimpleNamespace(cfg=types.SimpleNamespace(rl=cfg), trainer=trainer, iteration=0,
                                buffer=SegmentReplayBuffer(cfg.replay, group_size=K))
    return job, lines


def _open_groups(buffer, count: int, *, finished: int) -> None:
    """``count`` new groups; the first ``finished`` of them finish, the others keep one
    trajectory open (it hit the segment budget)."""
    for g in range(count):
        ids = buffer.add_group(g, torch.tensor([5, 6, 7]))
        for j, tid in enumerate(ids):
            done = g < finished or j == 0
            buffer.add_segment(tid, torch.tensor([8, 9]), torch.tensor([-0.5, -0.25]), iteration=0,
                               policy_version=0, finish_reason="stop" if done else None)


def test_every_multiple_of_ranks_times_updates_is_taken():
    # the reported configuration: DP 2, 2 updates, 8 groups per micro-batch, 16 prompts
    job, lines = _job(dp=2, updates=2, groups_per_micro_batch=8)
    _open_groups(job.buffer, 16, finished=16)
    batch, metrics = RLJob.pop_ready_groups(job)
    assert batch is not None and batch.num_groups == 16
    assert metrics == {"rollout/groups_ready": 16.0, "rollout/groups_open": 0.0, "train/groups": 16.0}
    assert lines == [] and len(job.buffer) == 0
    # 7 finished + 2 open: 4 taken (oldest first), 3 finished wait
    _open_groups(job.buffer, 9, finished=7)
    batch, metrics = RLJob.pop_ready_groups(job)
    assert batch.num_groups == 4 and batch.prompt_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert metrics == {"rollout/groups_ready": 7.0, "rollout/groups_open": 2.0, "train/groups": 4.0}
    assert len(job.buffer.ready_groups()) == 3


def test_an_iteration_with_too_few_finished_groups_says_why():
    job, lines = _job(dp=1, updates=2, groups_per_micro_batch=1)
    _open_groups(job.buffer, 3, finished=1)
    job.iteration = 4
    batch, metrics = RLJob.pop_ready_groups(job)
    assert batch is None
    assert metrics == {"rollout/groups_ready": 1.0, "rollout/groups_open": 2.0, "train/groups": 0.0}
    [line] = lines
    assert line.startswith("rl: iteration 5 trains nothing: 1 group(s) finished, 2 still open"), line
    assert "rl.updates_per_iteration=2 x data-parallel size 1" in line and "\n" not in line
    assert len(job.buffer.ready_groups()) == 1, "the finished group must wait, not be dropped"
