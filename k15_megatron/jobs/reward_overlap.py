"""Task rewards of finished groups, computed while generation continues.

A rollout iteration generates every open trajectory in one vLLM batch; its groups finish at
different times (short responses first). ``OverlappedRewards`` scores a group's k responses on a
background thread as soon as the group's last trajectory finishes, while the engine keeps
generating the rest, so the reward stage after generation only scores what finished last (and
what another replica generated). Used on the rank that scores (rank 0, see
:mod:`k15_megatron.jobs.rl_rewards`)::

    overlap = OverlappedRewards(manager, records, tokenizer)
    rollout_iteration(..., on_finished=overlap.watch(buffer))   # submits finished groups
    batch = buffer.pop_batch(...)
    scores = overlap.take(batch.trajectory_ids)                  # waits; {trajectory id: task reward}

Scores are the reward manager's own: the same decoded text (:func:`decode_response`) and prompt
record as the synchronous path, so the rewards do not depend on whether a group was scored early
(tested). One thread does all the scoring, one group at a time, so the manager is never called
concurrently; ``take`` waits for it, so the caller may use the manager afterwards. Heavy reward
functions (math-verify, the code sandbox) already run in worker processes, so the thread mostly
waits on them and costs the generating thread little.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from k15_megatron.rl.replay import SegmentReplayBuffer
from k15_megatron.rollout.engine import SegmentResult


def decode_response(tokenizer, token_ids: torch.Tensor) -> str:
    """A response's text as the reward functions see it: ``[R]`` int64 ids, special tokens
    (EOS) dropped."""
    return tokenizer.decode(token_ids.tolist(), skip_special_tokens=True)


class OverlappedRewards:
    """Scores finished groups on a background thread (see the module docstring).

    ``manager``: a :class:`~k15_megatron.rewards.registry.RewardManager`; ``records``: prompt id
    -> the data set's record (what ``manager.score`` reads); ``tokenizer``: decodes responses.
    """

    def __init__(self, manager, records: Sequence, tokenizer):
        self.manager, self.records, self.tokenizer = manager, records, tokenizer
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k15-rewards")
        self._futures: list[Future] = []
        self._scores: dict[int, float] = {}
        self._lock = threading.Lock()
        self._busy_s = 0.0

    def watch(self, buffer: SegmentReplayBuffer) -> Callable[[SegmentResult], None]:
        """The ``on_finished`` callback of one generation call over ``buffer``'s open
        trajectories (results not yet recorded in it): when a segment finishes its trajectory
        and the trajectory's group has no other unfinished member, the group is submitted."""
        finished_now: dict[int, torch.Tensor] = {}  # trajectory id -> its whole response

        def on_finished(result: SegmentResult) -> None:
            tid = result.trajectory_id
            reason = None if result.finish_reason == "budget" else result.finish_reason
            if not buffer.segment_closes(tid, reason):
                return
            finished_now[tid] = torch.cat([buffer.trajectory(tid).response_tokens(), result.tokens])
            group = buffer.group_of(tid)
            if all(t.finished or t.trajectory_id in finished_now for t in group):
                items = [(t.trajectory_id, t.prompt_id,
                          t.response_tokens() if t.finished else finished_now[t.trajectory_id]) for t in group]
                self._futures.append(self._thread.submit(self._score, items))

        return on_finished

    def _score(self, items: list[tuple[int, int, torch.Tensor]]) -> None:
        start = time.perf_counter()
        texts = [decode_response(self.tokenizer, tokens) for _, _, tokens in items]
        scores = self.manager.score(texts, [self.records[prompt_id] for _, prompt_id, _ in items])
        with self._lock:
            self._scores.update((tid, float(s)) for (tid, _, _), s in zip(items, scores))
            self._busy_s += time.perf_counter() - start

    def take(self, trajectory_ids: torch.Tensor) -> tuple[dict[int, float], float]:
        """Wait for the submitted groups (re-raising a reward function's exception), then
        remove and return the scores of ``trajectory_ids`` ([B] int64) that were computed:
        ({trajectory id: task reward}, seconds the thread spent scoring since the last take).
        Groups not in this batch stay for a later one."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()
        with self._lock:
            found = {int(t): self._scores.pop(int(t)) for t in trajectory_ids.tolist() if int(t) in self._scores}
            busy, self._busy_s = self._busy_s, 0.0
        return found, busy

    def close(self) -> None:
        """Stop the thread (pending groups are finished first)."""
        self._thread.shutdown(wait=True)
