"""The CPU side of the device seam: every workaround that lets the GPU stack run on a CPU-only
machine lives here, applied only where CUDA is absent (a GPU machine runs the libraries untouched).

* :mod:`~k15_megatron.parallel.cpu.megatron` -- Megatron-Core on gloo: CUDA calls redirected
  to the CPU, the collectives gloo lacks, the MoE dispatchers' CUDA streams and buffers
  (installed by :func:`k15_megatron.parallel.device.setup_device` on CPU only).
* :mod:`~k15_megatron.parallel.cpu.torchvision_hook` -- the registry's CUDA build of torchvision
  imported on the CPU build of torch (an interpreter start-up hook the set-up script installs).
* :mod:`~k15_megatron.parallel.cpu.vllm_mla` -- vLLM's CPU engine for multi-latent-attention
  models: the float32-capable attention backend and its RoPE kernel bypassed for MLA's query.
"""
