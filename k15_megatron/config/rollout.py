"""The `rollout:` section of the configuration: the vLLM rollout engine (PAPER.md sections 4-5).

Plain dataclass (OmegaConf-structured compatible). Defaults live here and only here; YAML
recipes override them. Per-field rules use the schema's ``one_of`` / ``at_least`` helpers;
cross-field rules live in ``RolloutConfig.config_errors(prefix)``, which the generic schema
validator calls with the section's dotted key.

What lives elsewhere: the per-iteration output-token budget of partial rollouts is
``rl.replay.segment_token_budget`` and the repeat-detection thresholds are ``rl.repeat``
(both shared with the replay buffer and the reward shaping); the engine's random seed is the
root ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from k15_megatron.config.fields import at_least, one_of

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
ROLLOUT_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class RolloutConfig:
    """vLLM engine created inside the training processes, and how it samples."""

    tensor_parallel_size: int = at_least(1, 1)
    """vLLM tensor-parallel size, independent of training's ``parallel.tensor``. It must divide
    the world size; world / tensor_parallel_size engine replicas (vLLM data-parallel ranks)
    each generate their own share of the prompts."""
    max_response_tokens: Optional[int] = at_least(None, 1)
    """Longest response (all segments of a trajectory together); reaching it finishes the
    trajectory with reason 'max_length'. null: half of max_model_len, at most
    :data:`DEFAULT_MAX_RESPONSE_TOKENS` (filled in when the config is validated)."""
    max_model_len: Optional[int] = at_least(None, 2)
    """vLLM context length in tokens (prompt + response); null takes the model's context.
    The model's context is max_position_embeddings (of the model's config.json, or
    model.max_position_embeddings), filled in when the config is validated; a value above it
    is refused. A prompt longer than
    max_model_len - max_response_tokens is dropped at load or refused (``data.too_long``), never
    given a silently shorter response cap. ``k15 rl|eval`` refuse max_response_tokens >=
    max_model_len before they start."""
    temperature: float = 1.0
    """Sampling temperature of ``k15 rl``'s rollouts; only 1.0 is accepted. The trainer's
    log-probs (the loss, the reference recompute, the importance ratios) are those of the
    policy at temperature 1, so samples drawn at another temperature would come from a
    distribution the loss does not model. Evaluation samples at ``eval.temperature``."""
    top_p: float = 1.0
    """Nucleus sampling of ``k15 rl``'s rollouts; only 1.0 (off) is accepted, for the reason
    given under ``temperature``: a truncated distribution is not the policy the loss models."""
    top_k: int = at_least(0, 0)
    """Top-k sampling of ``k15 rl``'s rollouts; only 0 (off) is accepted (see ``top_p``)."""
    logprobs_mode: str = one_of("raw_logprobs", LOGPROBS_MODES)
    """Which log-prob of each sampled token is recorded as the behaviour log-prob:
    raw_logprobs = log softmax of the model's logits, i.e. the policy pi_theta itself at
    temperature 1, whatever temperature/top-p/top-k sampled it (what the trainer recomputes,
    so the log-ratio log pi_theta/pi_i of the loss is exact) | processed_logprobs = after
    temperature, top-k/top-p and logits processors: the distribution the token was really
    drawn from (use it for importance weights against the sampling distribution). The two
    agree at temperature 1 without top-k/top-p, and at temperature 0 (greedy: no temperature
    is applied, both are the model's log-probs)."""
    dtype: str = one_of("auto", ROLLOUT_DTYPES)
    """Engine weights/activations: auto (float32 on CPU, the checkpoint's dtype on GPU) |
    float32 | bfloat16 | float16."""
    gpu_memory_utilization: float = 0.5
    """GPU: fraction of the device memory vLLM may take for weights + KV cache (the rest stays
    with Megatron). Not used on CPU (see cpu_kv_cache_gib)."""
    cpu_kv_cache_gib: float = 1.0
    """CPU: KV-cache size in GiB. Fixed because the CPU backend's utilisation-based sizing
    reserves a fraction of the whole NUMA node and fails when other processes hold memory.
    vLLM's legacy env var VLLM_CPU_KVCACHE_SPACE, if set, overrides it."""
    enforce_eager: bool = False
    """Skip CUDA graphs on GPU (slower decoding, faster start). The CPU backend always runs
    eager here: its compiled mode costs minutes of start-up for no gain at test sizes."""
    enable_prefix_caching: bool = True
    """Reuse KV of shared prefixes: the k samples of a prompt share its prefill. Reset after
    every weight update (RolloutEngine.mark_weights_updated), since cached KV is per-weights."""
    max_num_seqs: int = at_least(256, 1)
    """Most sequences vLLM decodes at once (its batch size)."""
    max_num_batched_tokens: Optional[int] = at_least(None, 1)
    """Most tokens per engine step (prefill chunking); null: vLLM's default."""
    repeat_check_interval: int = at_least(16, 1)
    """Generated tokens between two repeat checks of a running response (rl.repeat decides
    what a repeat is). The response is cut exactly where the thresholds were first met; at
    most interval - 1 tokens past that point are generated and dropped. Larger = less CPU per
    decoding step (the check costs ~40 us per call plus ~3 us per token)."""

    def config_errors(self, prefix: str) -> List[str]:
        """Cross-field checks; one message per problem naming its dotted key under ``prefix``."""
        errors: List[str] = []
        if self.temperature != 1.0:
            errors.append(
                f"{prefix}.temperature={self.temperature}: RL rollouts must sample at temperature "
                "1.0, the distribution whose log-probs the trainer computes (a tempered sample "
                f"would be off-policy for the loss); set {prefix}.temperature=1.0 (evaluation "
                "has its own eval.temperature)")
        if self.top_p != 1.0:
            errors.append(f"{prefix}.top_p={self.top_p}: RL rollouts must sample the untruncated "
                          f"policy (samples from a nucleus would be off-policy for the loss); set "
                          f"{prefix}.top_p=1.0")
        if self.top_k != 0:
            errors.append(f"{prefix}.top_k={self.top_k}: RL rollouts must sample the untruncated "
                          f"policy (samples from the top k would be off-policy for the loss); set "
                          f"{prefix}.top_k=0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            errors.append(f"{prefix}.gpu_memory_utilization={self.gpu_memory_utilization} must "
                          "be in (0, 1]")
        if self.cpu_kv_cache_gib <= 0:
            errors.append(f"{prefix}.cpu_kv_cache_gib={self.cpu_kv_cache_gib} must be > 0")
        return errors


DEFAULT_MAX_RESPONSE_TOKENS = 16384
"""The longest default response cap: a null ``rollout.max_response_tokens`` is half of
``max_model_len`` up to this (the other half is room for the prompt)."""


def response_budget_errors(cfg: RolloutConfig, *, prefix: str = "rollout", context_note: str = "") -> List[str]:
    """``max_response_tokens`` must leave room for a prompt in ``max_model_len``. Checked by the
    jobs that generate (``k15 rl``, ``k15 eval``) before they start, not with the section: an
    SFT config with a short-context model need not tune the rollout. ``context_note`` says
    where max_model_len came from."""
    if cfg.max_model_len is None or cfg.max_response_tokens is None or cfg.max_response_tokens < cfg.max_model_len:
        return []
    return [f"{prefix}.max_response_tokens={cfg.max_response_tokens} leaves no room for the prompt in "
            f"{prefix}.max_model_len={cfg.max_model_len}{context_note}; set {prefix}.max_response_tokens "
            f"below {cfg.max_model_len} minus the longest prompt (e.g. {prefix}.max_response_tokens="
            f"{cfg.max_model_len // 2})"]


def derive_max_model_len(cfg: RolloutConfig, *, context: int, context_source: str,
                         prefix: str = "rollout") -> List[str]:
    """Fill a null ``max_model_len`` with the model's ``context`` (tokens), then a null
    ``max_response_tokens`` with half of ``max_model_len`` (at most
    :data:`DEFAULT_MAX_RESPONSE_TOKENS`); refuse an explicit ``max_model_len`` above the
    context. ``context_source`` names where the context was read (e.g.
    ``max_position_embeddings in /m/config.json``). Returns the problems (one line each)."""
    if cfg.max_model_len is None:
        cfg.max_model_len = context
    if cfg.max_response_tokens is None:
        cfg.max_response_tokens = max(1, min(DEFAULT_MAX_RESPONSE_TOKENS, cfg.max_model_len // 2))
    if cfg.max_model_len > context:
        return [f"{prefix}.max_model_len={cfg.max_model_len} exceeds the model's context of {context} "
                f"tokens ({context_source}); set {prefix}.max_model_len to at most {context}, or to "
                "null to use the model's context"]
    return []
