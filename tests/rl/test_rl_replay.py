"""Segment replay buffer and RolloutBatch: partial-rollout flow, loss policies, exact restore."""

from __future__ import annotations

import io
from dataclasses import fields

import pytest
import torch

from k15_megatron.config.rl import ReplayConfig
from k15_megatron.rl.batch import RolloutBatch
from k15_megatron.rl.replay import SegmentReplayBuffer, segment_loss_mask

T = torch.tensor


def _lp(*values):
    return T(values, dtype=torch.float32)


def _two_iteration_buffer(policy="all", max_age=1):
    """Group A (prompt 7) = trajectories 0, 1; group B (prompt 3) = 2, 3. Budget 4 tokens.
    Iteration 0: 0 stops, 1 hits the budget, 2 and 3 stop. Iteration 1: 1 continues and stops."""
    buf = SegmentReplayBuffer(ReplayConfig(segment_token_budget=4, max_segments=3,
                                           segment_loss_policy=policy, max_segment_age=max_age),
                              group_size=2)
    assert buf.add_group(7, T([100, 101])) == [0, 1]
    assert buf.add_group(3, T([200])) == [2, 3]
    assert [t.trajectory_id for t in buf.unfinished()] == [0, 1, 2, 3]
    buf.add_segment(0, T([1, 2, 3]), _lp(-0.1, -0.2, -0.3), iteration=0, policy_version=0,
                    finish_reason="stop")
    buf.add_segment(1, T([4, 5, 6, 7]), _lp(-1, -2, -3, -4), iteration=0, policy_version=0)
    buf.add_segment(2, T([8]), _lp(-0.5), iteration=0, policy_version=0, finish_reason="stop")
    buf.add_segment(3, T([9, 10]), _lp(-0.6, -0.7), iteration=0, policy_version=0,
                    finish_reason="repeat")
    return buf


def test_partial_rollout_flow_and_batch_contents():
    buf = _two_iteration_buffer()
    assert buf.ready_groups() == [1]
    first = buf.pop_batch(iteration=0, pad_token_id=-1)
    assert first.trajectory_ids.tolist() == [2, 3] and first.prompt_ids.tolist() == [3, 3]
    assert torch.equal(first.input_ids, T([[200, 8, -1], [200, 9, 10]]))
    assert torch.equal(first.response_mask, T([[0, 1, 0], [0, 1, 1]], dtype=torch.bool))
    assert torch.equal(first.behaviour_logprobs, _lp(0, -0.5, 0, 0, -0.6, -0.7).view(2, 3))
    assert first.finish_reasons == ["stop", "repeat"] and first.rewards is None

    cont = buf.unfinished()
    assert [t.trajectory_id for t in cont] == [1]
    assert torch.equal(cont[0].response_tokens(), T([4, 5, 6, 7]))  # continuation prefix
    buf.add_segment(1, T([11, 12]), _lp(-5, -6), iteration=1, policy_version=1,
                    finish_reason="stop")
    second = buf.pop_batch(iteration=1)
    assert len(buf) == 0 and buf.pop_batch(iteration=1) is None
    assert torch.equal(second.input_ids, T([[100, 101, 1, 2, 3, 0, 0, 0],
                                            [100, 101, 4, 5, 6, 7, 11, 12]]))
    assert torch.equal(second.segment_index, T([[-1, -1, 0, 0, 0, -1, -1, -1],
                                                [-1, -1, 0, 0, 0, 0, 1, 1]], dtype=torch.int32))
    assert torch.equal(second.segment_iterations, T([[0, -1], [0, 1]]))
    assert torch.equal(second.segment_policy_versions, T([[0, -1], [0, 1]]))
    assert second.num_segments.tolist() == [1, 2] and second.response_lengths.tolist() == [3, 6]
    assert torch.equal(second.behaviour_logprobs[1, 2:], _lp(-1, -2, -3, -4, -5, -6))
    assert torch.equal(second.loss_mask, second.response_mask)  # policy "all"


@pytest.mark.parametrize("policy,max_age,expected_row1", [
    ("all", 0, [0, 0, 1, 1, 1, 1, 1, 1]),
    ("latest", 0, [0, 0, 0, 0, 0, 0, 1, 1]),
    ("recent", 0, [0, 0, 0, 0, 0, 0, 1, 1]),
    ("recent", 1, [0, 0, 1, 1, 1, 1, 1, 1]),
])
def test_segment_loss_policies(policy, max_age, expected_row1):
    buf = _two_iteration_buffer(policy, max_age)
    buf.pop_batch(iteration=0)
    buf.add_segment(1, T([11, 12]), _lp(-5, -6), iteration=1, policy_version=1,
                    finish_reason="stop")
    batch = buf.pop_batch(iteration=1)
    assert batch.loss_mask[1].int().tolist() == expected_row1
    # trajectory 0 finished at iteration 0 and waited one iteration for its sibling
    row0 = batch.loss_mask[0].int().tolist()
    assert row0 == ([0, 0, 0, 0, 0, 0, 0, 0] if policy == "recent" and max_age == 0
                    else [0, 0, 1, 1, 1, 0, 0, 0])


def test_segment_loss_mask_by_hand():
    m = segment_loss_mask([3, 5, 6, 6], [2, 1, 0, 3], policy="recent", iteration=7, max_age=1)
    assert m.tolist() == [False, False, False, True, True, True]
    assert segment_loss_mask([1, 2], [2, 2], policy="latest", iteration=9).tolist() == [
        False, False, True, True]
    assert segment_loss_mask([], [], policy="all", iteration=0).numel() == 0
    with pytest.raises(ValueError, match="segment_loss_policy"):
        segment_loss_mask([1], [1], policy="oldest", iteration=0)


def test_max_segments_and_errors():
    buf = SegmentReplayBuffer(ReplayConfig(segment_token_budget=2, max_segments=2), group_size=1)
    (tid,) = buf.add_group(0, T([1]))
    buf.add_segment(tid, T([5, 6]), _lp(-1, -1), iteration=0, policy_version=0)
    with pytest.raises(ValueError, match="segment_token_budget"):
        buf.add_segment(tid, T([1, 2, 3]), _lp(0, 0, 0), iteration=1, policy_version=1)
    with pytest.raises(ValueError, match="empty segment"):
        buf.add_segment(tid, T([], dtype=torch.long), _lp(), iteration=1, policy_version=1)
    traj = buf.add_segment(tid, T([7]), _lp(-1), iteration=1, policy_version=1)
    assert traj.finish_reason == "max_segments"
    with pytest.raises(ValueError, match="not an unfinished"):
        buf.add_segment(tid, T([7]), _lp(-1), iteration=2, policy_version=2)
    with pytest.raises(ValueError, match="equal length"):
        buf.add_group(1, T([1]))
        buf.add_segment(1, T([7, 8]), _lp(-1), iteration=2, policy_version=2)


def _assert_same(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, RolloutBatch):
        for f in fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    else:
        assert a == b, path


def test_save_restore_round_trip_is_exact():
    buf = _two_iteration_buffer("recent", 1)
    buf.add_group(9, T([300, 301, 302]))  # a fresh group with empty trajectories
    saved = io.BytesIO()
    torch.save(buf.state_dict(), saved)
    saved.seek(0)
    restored = SegmentReplayBuffer(buf.cfg, group_size=2)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    _assert_same(buf.state_dict(), restored.state_dict())
    for b in (buf, restored):  # identical futures: ids, continuations, batches
        assert b.add_group(1, T([5])) == [6, 7]
        b.add_segment(1, T([11, 12]), _lp(-5, -6), iteration=1, policy_version=1,
                      finish_reason="length")
    _assert_same(buf.pop_batch(iteration=1), restored.pop_batch(iteration=1), "batch")
    _assert_same(buf.state_dict(), restored.state_dict())
    with pytest.raises(ValueError, match="group_size"):
        SegmentReplayBuffer(buf.cfg, group_size=3).load_state_dict(buf.state_dict())


def test_rollout_batch_validation_and_group_sharding():
    buf = _two_iteration_buffer()
    buf.add_segment(1, T([11]), _lp(-5), iteration=1, policy_version=1, finish_reason="stop")
    batch = buf.pop_batch(iteration=1)
    assert batch.num_groups == 2 and batch.trajectory_ids.tolist() == [0, 1, 2, 3]
    shard1 = batch.shard_groups(1, 2)
    assert shard1.trajectory_ids.tolist() == [2, 3] and shard1.finish_reasons == ["stop", "repeat"]
    assert torch.equal(shard1.input_ids, batch.input_ids[2:])
    with pytest.raises(ValueError, match="shard"):
        batch.shard_groups(0, 3)
    bad = {f.name: getattr(batch, f.name) for f in fields(batch)}
    bad["loss_mask"] = batch.attention_mask
    with pytest.raises(ValueError, match="subset"):
        RolloutBatch(**bad)
    bad["loss_mask"], bad["rewards"] = batch.loss_mask, torch.zeros(3)
    with pytest.raises(ValueError, match="rewards"):
        RolloutBatch(**bad)
    bad["rewards"], bad["group_size"] = None, 3
    with pytest.raises(ValueError, match="groups"):
        RolloutBatch(**bad)
