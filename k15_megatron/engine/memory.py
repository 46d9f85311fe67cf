"""Freeing and restoring the trainer's device memory around rollouts (GPU only).

On a GPU the trainer and the colocated vLLM engine share the device, so during rollouts the
trainer gives back what it does not need: Megatron DDP's gradient buffers (zeroed at the next
step anyway: released, not copied), the optimizer's state tensors (copied to host, or dropped
when the per-iteration optimizer reset discards them anyway) and optionally the parameters.
On CPU there is no separate device memory to give back: every function here returns without
doing anything (the device seam's ``HAVE_CUDA``), so CPU and GPU run the same calls.

NOT YET RUN ON A GPU (no GPU was lent to the sessions that wrote this); see docs/gpu.md.
"""

from __future__ import annotations

import torch

from k15_megatron.parallel.device import HAVE_CUDA, empty_device_cache


def _leaf_optimizers(optimizer):
    members = getattr(optimizer, "chained_optimizers", None)
    if members is not None:
        for member in members:
            yield from _leaf_optimizers(member)
    elif "optimizer" in getattr(optimizer, "__dict__", {}) or hasattr(type(optimizer), "optimizer"):
        yield from _leaf_optimizers(optimizer.optimizer)
    elif optimizer is not None:
        yield optimizer


def _grad_buffers(model_chunks):
    for chunk in model_chunks:
        for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            yield buffer


def release_grad_buffers(model_chunks) -> int:
    """Free the storage of every DDP gradient buffer; returns bytes released (0 on CPU)."""
    if not HAVE_CUDA:
        return 0
    released = 0
    for buffer in _grad_buffers(model_chunks):
        storage = buffer.grad_data.untyped_storage()
        released += storage.size()
        storage.resize_(0)
    empty_device_cache()
    return released


def restore_grad_buffers(model_chunks) -> None:
    """Re-allocate the DDP gradient buffers released by :func:`release_grad_buffers` (zeroed)."""
    if not HAVE_CUDA:
        return
    for buffer in _grad_buffers(model_chunks):
        data = buffer.grad_data
        data.untyped_storage().resize_(data.numel() * data.element_size())
        data.zero_()


def offload_optimizer_states(optimizer) -> int:
    """Move every optimizer state tensor to pinned host memory; returns bytes moved (0 on CPU)."""
    if not HAVE_CUDA:
        return 0
    moved = 0
    for leaf in _leaf_optimizers(optimizer):
        for state in leaf.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.is_cuda:
                    moved += value.numel() * value.element_size()
                    state[key] = value.to("cpu", non_blocking=True).pin_memory()
    torch.cuda.synchronize()
    empty_device_cache()
    return moved


def onload_optimizer_states(optimizer) -> None:
    """Bring the optimizer state back to the GPU (inverse of :func:`offload_optimizer_states`)."""
    if not HAVE_CUDA:
        return
    device = torch.device("cuda", torch.cuda.current_device())
    for leaf in _leaf_optimizers(optimizer):
        for state in leaf.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and not value.is_cuda and value.dim() > 0:
                    state[key] = value.to(device, non_blocking=True)
    torch.cuda.synchronize()


def offload_params(model_chunks) -> int:
    """Copy DDP parameter buffers to host and free their device storage; returns bytes (0 on CPU)."""
    if not HAVE_CUDA:
        return 0
    moved = 0
    for buffer in _grad_buffers(model_chunks):
        data = buffer.param_data
        if data is None:
            continue
        buffer.param_host_copy = data.to("cpu", non_blocking=True).pin_memory()
        moved += data.numel() * data.element_size()
    torch.cuda.synchronize()
    for buffer in _grad_buffers(model_chunks):
        if getattr(buffer, "param_host_copy", None) is not None:
            buffer.param_data.untyped_storage().resize_(0)
    empty_device_cache()
    return moved


def onload_params(model_chunks) -> None:
    """Restore the parameter buffers moved by :func:`offload_params`."""
    if not HAVE_CUDA:
        return
    for buffer in _grad_buffers(model_chunks):
        host = getattr(buffer, "param_host_copy", None)
        if host is None:
            continue
        data = buffer.param_data
        data.untyped_storage().resize_(data.numel() * data.element_size())
        data.copy_(host, non_blocking=True)
        buffer.param_host_copy = None
    torch.cuda.synchronize()
