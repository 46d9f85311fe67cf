"""k15_megatron.jobs: the commands a user runs (sft, rl, eval, tiny, export, plot) and what only they use."""
