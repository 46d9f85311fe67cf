"""k15_megatron.rollout."""
