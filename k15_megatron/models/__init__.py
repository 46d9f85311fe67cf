"""k15_megatron.models."""
