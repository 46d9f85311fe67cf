"""k15_megatron.engine."""
