"""k15_megatron.rl."""
