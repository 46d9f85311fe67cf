"""Task rewards computed while generation continues.

A rollout iteration generates every open trajectory in one vLLM batch; responses finish at
different times (short ones first). ``OverlappedRewards`` scores finished responses on a
background thread, in chunks of ``chunk`` (the group size in ``k15 rl``) as they finish, while
the engine keeps generating the rest, so the reward stage after generation only scores what was not
scored yet: the last chunk's remainder, and what another replica generated (rank 0 sees its own
replica's responses as they finish). Used on the rank that scores (rank 0, see
:mod:`k15_megatron.jobs.rl_rewards`)::

    overlap = OverlappedRewards(manager, records, tokenizer, chunk=k)
    rollout_iteration(..., on_finished=overlap.watch(buffer))   # submits finished responses
    batch = buffer.pop_batch(...)
    scores, busy_s = overlap.take(batch.trajectory_ids)          # waits; {trajectory id: task reward}

A response's score is the reward manager's own: the same decoded text (:func:`decode_response`)
and prompt record as the synchronous path, so the rewards do not depend on when a response was
scored (tested). Scores of responses whose group is not complete stay until a later batch takes
them. One thread does all the scoring, one chunk at a time, so the manager is never called
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
    """Scores finished responses on a background thread (see the module docstring).

    ``manager``: a :class:`~k15_megatron.rewards.registry.RewardManager`; ``records``: prompt id
    -> the data set's record (what ``manager.score`` reads); ``tokenizer``: decodes responses.
    """

    def __init__(self, manager, records: Sequence, tokenizer, *, chunk: int = 1):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.manager, self.records, self.tokenizer, self.chunk = manager, records, tokenizer, chunk
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k15-rewards")
        self._futures: list[Future] = []
        self._scores: dict[int, float] = {}
        self._lock = threading.Lock()
        self._busy_s = 0.0

    def watch(self, buffer: SegmentReplayBuffer) -> Callable[[SegmentResult], None]:
        """The ``on_finished`` callback of one generation call over ``buffer``'s open
        trajectories (results not yet recorded in it): a segment that finishes its trajectory
        joins the pending responses, submitted ``chunk`` at a time. A remainder of fewer than
        ``chunk`` is left to the reward stage."""
        pending: list[tuple[int, int, torch.Tensor]] = []

        def on_finished(result: SegmentResult) -> None:
            tid = result.trajectory_id
            reason = None if result.finish_reason == "budget" else result.finish_reason
            if not buffer.segment_closes(tid, reason):
                return
            traj = buffer.trajectory(tid)
            pending.append((tid, traj.prompt_id, torch.cat([traj.response_tokens(), result.tokens])))
            if len(pending) >= self.chunk:
                self._futures.append(self._thread.submit(self._score, list(pending)))
                pending.clear()

        return on_finished

    def _score(self, items: list[tuple[int, int, torch.Tensor]]) -> None:
        start = time.perf_counter()
        texts = [decode_response(self.tokenizer, tokens) for _, _, tokens in items]
        scores = self.manager.score(texts, [self.records[prompt_id] for _, prompt_id, _ in items])
        with self._lock:
            self._scores.update((tid, float(s)) for (tid, _, _), s in zip(items, scores))
            self._busy_s += time.perf_counter() - start

    def take(self, trajectory_ids: torch.Tensor) -> tuple[dict[int, float], float]:
        """Wait for the submitted chunks (re-raising a reward function's exception), then
        remove and return the scores of ``trajectory_ids`` ([B] int64) that were computed:
        ({trajectory id: task reward}, seconds the thread spent scoring since the last take).
        Scores of responses not in this batch stay for a later one."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()
        with self._lock:
            found = {int(t): self._scores.pop(int(t)) for t in trajectory_ids.tolist() if int(t) in self._scores}
            busy, self._busy_s = self._busy_s, 0.0
        return found, busy

    def close(self) -> None:
        """Stop the thread (submitted chunks are finished first)."""
        self._thread.shutdown(wait=True)
