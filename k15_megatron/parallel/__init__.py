"""k15_megatron.parallel."""
