"""Repeat detection at the tail of a response (PAPER.md section 4) and its optional penalty.

A response "repeats" when its tail is periodic: for some period p in [1, max_period] the last
L tokens satisfy t[j] == t[j - p], with L >= need(p) = max(min_repeats * p, min_span_tokens).
That covers a token repeated over and over (p = 1), a repeated n-gram and a repeated block of
text alike; ``min_span_tokens`` keeps short periods (rulers like "-----", "1 1 1") from firing
on short runs.

``RepeatDetector`` is meant to be fed while generating. It keeps, for every period p, the
number of consecutive most recent positions with t[j] == t[j - p]; the periodic tail for p is
that run + p tokens long. Feeding c tokens costs O(c * max_period) work (vectorised in blocks)
and O(max_period) memory, independent of the response length, and it reports the exact token
at which the thresholds were first met. ``find_tail_repeat`` checks a finished sequence once in
O(max_period * max(min_repeats * max_period, min_span_tokens)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from k15_megatron.config.rl import RepeatConfig

Tokens = Union[torch.Tensor, Sequence[int]]
_BLOCK = 1024  # tokens per vectorised step: bounds the [block, max_period] work matrix


@dataclass(frozen=True)
class TailRepeat:
    """A periodic tail: ``period`` tokens per block, the periodic part is the last ``length``
    tokens of the first ``end`` tokens (``end`` = tokens seen when it was found)."""

    period: int
    length: int
    end: int


def _as_tensor(tokens: Tokens) -> torch.Tensor:
    t = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(list(tokens), dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"token ids must be 1-D, got shape {tuple(t.shape)}")
    return t.long()


def _check_thresholds(max_period: int, min_repeats: int, min_span_tokens: int) -> None:
    if max_period < 1 or min_repeats < 2 or min_span_tokens < 0:
        raise ValueError(f"need max_period >= 1, min_repeats >= 2, min_span_tokens >= 0; got "
                         f"{max_period}, {min_repeats}, {min_span_tokens} (rl.repeat.*)")


def _needed_runs(max_period: int, min_repeats: int, min_span_tokens: int) -> torch.Tensor:
    """[max_period] run length (matches t[j] == t[j-p]) that period p = 1.. needs."""
    p = torch.arange(1, max_period + 1)
    return torch.clamp(min_repeats * p, min=min_span_tokens) - p


def find_tail_repeat(token_ids: Tokens, *, max_period: int, min_repeats: int,
                     min_span_tokens: int = 0) -> Optional[TailRepeat]:
    """The smallest period whose repetition ends the sequence and meets the thresholds.

    Args:
        token_ids: [n] token ids (tensor or list).
        max_period, min_repeats, min_span_tokens: see the module doc / ``rl.repeat``.

    Returns:
        A ``TailRepeat`` with the full length of the periodic tail, or None.
    """
    _check_thresholds(max_period, min_repeats, min_span_tokens)
    t = _as_tensor(token_ids)
    n = t.numel()
    needed = _needed_runs(max_period, min_repeats, min_span_tokens).tolist()
    for p in range(1, min(max_period, n) + 1):
        k = needed[p - 1]
        if k + p > n:
            continue
        if torch.equal(t[n - k:], t[n - k - p:n - p]):
            mismatch = (t[p:] != t[:-p]).nonzero()
            run = n - p if mismatch.numel() == 0 else n - p - 1 - int(mismatch[-1])
            return TailRepeat(period=p, length=run + p, end=n)
    return None


class RepeatDetector:
    """Incremental tail-repeat detector for one response being generated (see module doc)."""

    def __init__(self, *, max_period: int, min_repeats: int, min_span_tokens: int = 0):
        _check_thresholds(max_period, min_repeats, min_span_tokens)
        self.max_period = max_period
        self._needed = _needed_runs(max_period, min_repeats, min_span_tokens)
        self._runs = torch.zeros(max_period, dtype=torch.long)
        self._history = torch.zeros(0, dtype=torch.long)  # the last <= max_period tokens
        self.num_tokens = 0
        self.detected: Optional[TailRepeat] = None

    @classmethod
    def from_config(cls, cfg: RepeatConfig) -> "RepeatDetector":
        return cls(max_period=cfg.max_period, min_repeats=cfg.min_repeats,
                   min_span_tokens=cfg.min_span_tokens)

    def feed(self, new_tokens: Tokens) -> bool:
        """Append tokens; True once a repeat has been detected (sticky: later calls return
        True without consuming). ``self.detected.end`` is the number of tokens after which it
        first held, which may lie inside this call's tokens: stop the response there."""
        if self.detected is not None:
            return True
        new = _as_tensor(new_tokens)
        for s in range(0, new.numel(), _BLOCK):
            if self._feed_block(new[s:s + _BLOCK]):
                return True
        return False

    def _feed_block(self, new: torch.Tensor) -> bool:
        c, h, big_p = new.numel(), self._history.numel(), self.max_period
        buf = torch.cat([self._history, new])
        # eq[j, p-1]: new[j] == the token p positions before it (False where none exists)
        j = torch.arange(c).unsqueeze(1)
        src = h + j - torch.arange(1, big_p + 1).unsqueeze(0)  # index into buf
        eq = (src >= 0) & (buf[src.clamp(min=0)] == new.unsqueeze(1))
        # run at row j: rows since the last mismatch, or the carried run plus j + 1
        last_false = torch.where(eq, torch.full_like(src, -1), j.expand_as(src))
        last_false = torch.cummax(last_false, dim=0).values
        runs = torch.where(last_false < 0, self._runs.unsqueeze(0) + j + 1, j - last_false)
        hit = runs >= self._needed.unsqueeze(0)
        if hit.any():
            row = int(hit.any(dim=1).nonzero()[0])
            period = int(hit[row].nonzero()[0]) + 1
            length = int(runs[row, period - 1]) + period
            self.num_tokens += row + 1
            self.detected = TailRepeat(period=period, length=length, end=self.num_tokens)
            return True
        self._runs = runs[-1].clone()
        self._history = buf[-big_p:].clone()
        self.num_tokens += c
        return False


def repeat_penalty(rewards: torch.Tensor, repeated: torch.Tensor, penalty: float) -> torch.Tensor:
    """rewards - penalty for responses stopped for repetition ([B] float32, [B] bool)."""
    if penalty < 0:
        raise ValueError(f"rl.repeat.penalty must be >= 0 (it is subtracted), got {penalty}")
    return rewards.to(torch.float32) - penalty * repeated.to(torch.float32)
