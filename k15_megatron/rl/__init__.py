"""k15_megatron.rl: the algorithm of PAPER.md sections 1-4 as pure tensor code.

Imports only torch, the stdlib and ``k15_megatron.config`` (never Megatron or vLLM).

- ``batch``:       RolloutBatch, the one container for rollout results (tokens, masks,
                   behaviour log-probs, rewards, segment metadata).
- ``replay``:      SegmentReplayBuffer, partial rollouts as chains of segments; segment loss
                   policies; exact save/restore.
- ``loss``:        sequence_logprobs, group_baseline (tau log Z), mirror_descent_loss.
- ``logprobs``:    token_logprobs, chunked and vocabulary-parallel, memory-bounded backward.
- ``shaping``:     length_penalty and its warm-up schedule.
- ``sampling``:    PromptSampler (uniform / prioritised 1 - s_i / curriculum), checkpointable.
- ``repeat``:      RepeatDetector / find_tail_repeat and the optional repeat penalty.
- ``mismatch``:    behaviour vs trainer log-prob metrics and truncated importance weights.
- ``optim_reset``: reset_optimizer_state, the per-iteration optimizer reset.
"""
