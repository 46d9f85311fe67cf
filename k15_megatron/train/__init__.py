"""k15_megatron.train."""
