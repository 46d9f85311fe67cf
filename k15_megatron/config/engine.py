"""The ``engine:`` section: how the colocated hybrid engine switches between train and rollout.

Plain dataclass, defaults only here. Memory steps (offloading, vLLM sleep) act on GPUs only;
on CPU they are skipped by the device seam and the same config is valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from k15_megatron.config.fields import at_least, one_of


@dataclass
class EngineConfig:
    """Switching the same processes between Megatron training and vLLM rollouts."""

    offload_optimizer_states: bool = True
    """GPU: move the optimizer's state tensors to host memory during rollouts (freed instead
    of copied when rl.reset_optimizer discards them anyway)."""
    offload_grad_buffers: bool = True
    """GPU: release Megatron DDP's gradient buffers during rollouts (they are zeroed at the
    next step anyway, so nothing is copied)."""
    offload_params: bool = False
    """GPU: also move the trainer's parameter buffers to host memory during rollouts (after
    the weight sync). Frees the most memory, costs a host round trip per iteration."""
    vllm_sleep_level: int = one_of(1, (1, 2))
    """GPU: vLLM sleep mode during training: 1 = drop the KV cache and offload weights to host,
    2 = drop both (weights are re-synced from Megatron anyway, so 2 is safe here)."""
    sync_bucket_mb: int = at_least(256, 1)
    """Pipeline-parallel weight sync: bytes per broadcast bucket (bounds the extra memory)."""
    check_num_sequences: int = at_least(4, 0)
    """After every weight sync, sample this many sequences with the engine and compare their
    behaviour log-probs with the trainer's recomputed ones (0 disables the check)."""
    check_max_tokens: int = at_least(32, 1)
    """Tokens generated per check sequence."""
    check_max_abs_diff: Optional[float] = None
    """Stop the run when the mean absolute log-prob difference of the check exceeds this
    (null: only log the metric). float32 CPU runs agree to ~1e-6; bf16 GPU runs to ~1e-2."""

    def config_errors(self, prefix: str) -> List[str]:
        errors: List[str] = []
        if self.check_max_abs_diff is not None and self.check_max_abs_diff <= 0:
            errors.append(f"{prefix}.check_max_abs_diff={self.check_max_abs_diff} must be > 0 or null")
        return errors
