"""Rollouts with vLLM, colocated in the training processes (PAPER.md sections 4-5).

- ``build``:       the vLLM ``LLM`` from the ``rollout`` config: SPMD layout (external_launcher,
                   own tensor-parallel size, replicas), CPU specifics.
- ``engine``:      ``RolloutEngine.generate(requests, sampling=...)``: one response segment per
                   request with behaviour log-probs and a finish reason (stop / budget / repeat /
                   max_length); ``.llm`` for the weight sync, ``mark_weights_updated``.
- ``repeat_stop``: repeat detection during generation: the cut rule around
                   ``rl.repeat.RepeatDetector``; ``repeat_processor`` the vLLM logits processor.
- ``partial``:     partial rollouts through the segment replay buffer (``rollout_iteration``).
- ``replicas``:    ``generate_everywhere``: generation over all engine replicas, every rank
                   receiving every result.

vLLM is imported only when an engine is built (``repeat_processor`` is loaded by vLLM itself),
so importing this package is cheap.
"""

from k15_megatron.rollout.engine import (FINISH_REASONS, RolloutEngine, Sampling, SegmentRequest,
                                         SegmentResult)
from k15_megatron.rollout.partial import (IterationStats, expand_prompts, open_groups,
                                          pending_requests, record_results, rollout_iteration)
from k15_megatron.rollout.replicas import generate_everywhere

__all__ = [
    "FINISH_REASONS", "IterationStats", "RolloutEngine", "Sampling", "SegmentRequest",
    "SegmentResult", "expand_prompts", "generate_everywhere", "open_groups", "pending_requests", "record_results",
    "rollout_iteration",
]
