"""k15-megatron: the Kimi k1.5 RL recipe on Megatron-Core.

Sub-packages mirror the architecture: ``config`` (experiment schema and loading),
``parallel`` (process groups and the CPU device seam), ``models`` (Megatron-Core model
builders), ``checkpoint`` (conversion and checkpoint I/O), ``rollout`` (vLLM), ``engine``
(the colocated hybrid engine), ``rl`` (losses, shaping, sampling, replay), ``rewards``,
``data`` and ``train``.
"""

__version__ = "0.1.0"
