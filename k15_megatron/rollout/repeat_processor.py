"""The vLLM v1 logits processor that stops repeating responses (see ``repeat_stop``).

vLLM loads it by name (``repeat_stop.REPEAT_STOP_PROCESSOR``) when the engine is built; it
keeps one primed ``RepeatDetector`` per running request that opted in, feeds it the request's
new tokens every ``check_interval`` tokens, and makes EOS the only choice of a row once its
detector fired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from k15_megatron.config.rl import RepeatConfig
from k15_megatron.rl.repeat import RepeatDetector
from k15_megatron.rollout.repeat_stop import EXTRA_ARGS_KEY, primed_detector


@dataclass
class _Row:
    """Detector state of one running request."""

    detector: RepeatDetector
    outputs: Sequence[int]  # vLLM's live output-token list of the request (grows each step)
    consumed: int
    check_interval: int
    eos_token_id: int
    stopped: bool = False

    def poll(self) -> None:
        if self.stopped:
            return
        end = len(self.outputs)
        # Async scheduling (GPU) appends -1 placeholders that are filled in later.
        while end > self.consumed and self.outputs[end - 1] < 0:
            end -= 1
        if end - self.consumed >= self.check_interval:
            self.stopped = self.detector.feed(list(self.outputs[self.consumed:end]))
            self.consumed = end


def _new_row(params, prompt_tok_ids: Optional[list[int]], output_tok_ids: list[int]):
    args = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    if args is None or params.eos_token_id is None:  # not opted in, or ignore_eos
        return None
    cfg = RepeatConfig(max_period=args["max_period"], min_repeats=args["min_repeats"],
                       min_span_tokens=args["min_span_tokens"])
    n = args["prefix_len"]
    prefix = (prompt_tok_ids or [])[len(prompt_tok_ids or []) - n:] if n else []
    detector, _ = primed_detector(cfg, prefix)
    row = _Row(detector, output_tok_ids, 0, args["check_interval"], params.eos_token_id,
               stopped=detector.detected is not None)
    row.poll()  # a re-added (preempted) request may already hold outputs
    return row


class RepeatStopProcessor(LogitsProcessor):
    """Forces EOS on requests whose response repeats (see the module doc)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self._rows: dict[int, _Row] = {}  # batch index -> state

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if args is not None and int(args.get("check_interval", 0)) < 1:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}].check_interval must be >= 1")

    def is_argmax_invariant(self) -> bool:
        return False  # forcing EOS changes the greedy choice

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        process_dict_updates(self._rows, batch_update, _new_row)
        for row in self._rows.values():
            row.poll()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        stopped = [(i, r.eos_token_id) for i, r in self._rows.items() if r.stopped]
        if not stopped:
            return logits
        rows = torch.tensor([i for i, _ in stopped], device=logits.device)
        eos = torch.tensor([e for _, e in stopped], device=logits.device)
        logits[rows] = float("-inf")
        logits[rows, eos] = 0.0
        return logits
