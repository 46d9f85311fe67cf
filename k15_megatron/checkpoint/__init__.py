"""k15_megatron.checkpoint."""
