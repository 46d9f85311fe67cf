"""Repeat detection DURING generation: a vLLM v1 logits processor around ``RepeatDetector``.

PAPER.md section 4: repeated content is detected while generating and terminated early. The
detector and its thresholds are THE ones of :mod:`k15_megatron.rl.repeat` (``rl.repeat``);
this module only runs them inside vLLM's sampling loop and stops the response.

How it stops a response. vLLM 0.32's v1 engine accepts custom logits processors
(``LLM(logits_processors=[...])``, class ``vllm.v1.sample.logits_processor.LogitsProcessor``).
Each step, before the forward pass, ``update_state`` sees every running request's live
output-token list; every ``check_interval`` new tokens we feed them to the request's
``RepeatDetector``. Once it fires, ``apply`` makes EOS the only possible token of that row,
so vLLM ends the request at its next step. The caller (``RolloutEngine``) re-runs the same
detector over the returned tokens and cuts the response exactly at the token where the
thresholds were first met: the (at most ``check_interval``) tokens generated past it and the
forced EOS are dropped, and the finish reason is "repeat". So the processor only saves
compute; which tokens a response keeps is decided by the detector alone, identically with or
without the processor.

Why not vLLM's own ``SamplingParams.repetition_detection``: it checks exactly
``min_count * pattern`` tokens (no ``min_span_tokens`` guard, so "-----" rulers fire), sees only
the tokens of the current call (a continued partial rollout would lose its earlier segments),
and costs O(max_pattern^2) Python steps per token.

Continuations. A request continuing a partial rollout carries its earlier segments at the end
of its prompt; the detector is primed with the last ``prefix_window(cfg)`` of those tokens,
the longest tail the thresholds can ever need, so a repeat spanning the segment boundary is
found at the same token as in one long call.

Requests opt in through ``SamplingParams.extra_args[EXTRA_ARGS_KEY]`` (``repeat_stop_args``);
requests without it, or without an EOS to force (``ignore_eos``), are not tracked.

This module holds the vLLM-free part (the cut rule and the per-request arguments); the
processor class itself is :mod:`k15_megatron.rollout.repeat_processor`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from k15_megatron.config.rl import RepeatConfig
from k15_megatron.rl.repeat import RepeatDetector

EXTRA_ARGS_KEY = "k15_repeat_stop"
REPEAT_STOP_PROCESSOR = "k15_megatron.rollout.repeat_processor:RepeatStopProcessor"
"""Fully qualified name vLLM loads the processor by (works in any process layout)."""


def prefix_window(cfg: RepeatConfig) -> int:
    """Tokens of history that decide every future detection: a period-p repeat needs at most
    max(min_repeats * p, min_span_tokens) tokens, p <= max_period."""
    return max(cfg.min_repeats * cfg.max_period, cfg.min_span_tokens)


def primed_detector(cfg: RepeatConfig, prefix_tokens: Sequence[int]) -> tuple[RepeatDetector, int]:
    """A detector that has seen the tail of ``prefix_tokens`` (earlier segments).

    Returns ``(detector, fed)``: ``fed`` prefix tokens were fed, so a detection at
    ``detector.detected.end`` lies ``end - fed`` tokens into the new segment (<= 0: already in
    the prefix).
    """
    tail = list(prefix_tokens)[-prefix_window(cfg):]
    detector = RepeatDetector.from_config(cfg)
    if tail:
        detector.feed(tail)
    return detector, len(tail)


def repeat_cut(cfg: RepeatConfig, prefix_tokens: Sequence[int],
               new_tokens: Sequence[int]) -> Optional[int]:
    """Number of ``new_tokens`` to keep if the response repeats, else None.

    The cut is the token at which the ``rl.repeat`` thresholds were first met over the
    response (``prefix_tokens`` = its earlier segments, then ``new_tokens``); 0 when the
    prefix already ended in a repeat.
    """
    detector, fed = primed_detector(cfg, prefix_tokens)
    if detector.detected is None and not detector.feed(list(new_tokens)):
        return None
    return max(detector.detected.end - fed, 0)


def repeat_stop_args(cfg: RepeatConfig, *, prefix_len: int, check_interval: int) -> dict:
    """``SamplingParams.extra_args`` entry enabling the processor for one request.

    ``prefix_len``: how many trailing prompt tokens are the response's earlier segments.
    """
    if check_interval < 1:
        raise ValueError(f"rollout.repeat_check_interval must be >= 1, got {check_interval}")
    return {EXTRA_ARGS_KEY: {
        "max_period": cfg.max_period, "min_repeats": cfg.min_repeats,
        "min_span_tokens": cfg.min_span_tokens, "prefix_len": int(prefix_len),
        "check_interval": int(check_interval)}}
