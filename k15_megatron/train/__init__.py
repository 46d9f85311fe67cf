"""k15_megatron.train: Megatron trainer internals (setup, optimizer, schedule, step, policy update, log-prob recompute)."""
