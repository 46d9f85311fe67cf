"""k15_megatron.rewards."""
