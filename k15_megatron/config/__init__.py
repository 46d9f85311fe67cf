"""k15_megatron.config."""
