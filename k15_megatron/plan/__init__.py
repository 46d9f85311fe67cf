"""``k15 plan``: per-GPU memory of a configuration, computed before any process starts.

Pure arithmetic over the resolved config (imports config/ only; no torch, Megatron or vLLM):

* :mod:`.params` - parameter counts (the Hugging Face model's exact count, and one rank's shard);
* :mod:`.layout` - the parallel layout and numeric formats the estimate is made for;
* :mod:`.model_state` - weights, gradient buffers and optimizer states per rank;
* :mod:`.activations` - activations per layer, the micro-batch's tokens, the log-prob peak;
* :mod:`.rollout` - the colocated vLLM engine's share (weights, KV cache);
* :mod:`.budget` - the phases of a job (training step, hybrid switch) and their peaks;
* :mod:`.verdict` - fits or not against a GPU, and the smallest change that fits.
"""
