"""k15_megatron.data."""
