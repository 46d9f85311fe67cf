"""The ``engine:`` section: how the colocated hybrid engine switches between train and rollout.

Plain dataclass, defaults only here. The trainer's memory steps (engine/memory.py) run on every
device and report the bytes they free (``offload/*_bytes``); on CPU the host copies are plain
CPU tensors, on GPU pinned host memory. vLLM's sleep mode is CUDA-only (a no-op on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from k15_megatron.config.fields import at_least, one_of


@dataclass
class EngineConfig:
    """Switching the same processes between Megatron training and vLLM rollouts."""

    offload_optimizer_states: bool = True
    """Copy the optimizer's state tensors (Adam's moments) to host memory during rollouts and
    free them on the device. Ignored with rl.reset_optimizer: the state is then dropped at the
    switch to rollouts (the next update starts from a fresh state anyway)."""
    offload_grad_buffers: bool = True
    """Free Megatron DDP's gradient buffers during rollouts (they are zeroed at the next step
    anyway, so nothing is copied)."""
    offload_params: bool = False
    """Also copy the model parameters to host memory during rollouts (after the weight sync and
    the log-prob check) and free them on the device: DDP's flat parameter buffers with the
    distributed optimizer, each parameter otherwise. The fp32 main copies of a bf16/fp16
    optimizer stay. Frees the most memory, costs a host round trip per iteration."""
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
