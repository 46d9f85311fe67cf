"""Freeing and restoring the trainer's memory around rollouts (the hybrid engine's memory steps).

The trainer and the colocated vLLM engine share the device, so during rollouts the trainer
gives back what it does not need:

* :func:`release_grad_buffers`: Megatron DDP's gradient buffers are freed without a copy
  (the next training step zeroes them anyway); :meth:`Offloaded.restore` re-allocates them zeroed.
* :func:`offload_optimizer_states`: every per-parameter state tensor of the optimizer (Adam's
  moments; not 0-dim step counters) is copied to host memory and its storage freed.
  With ``rl.reset_optimizer`` the state is dropped instead
  (:func:`k15_megatron.rl.optim_reset.reset_optimizer_state`): nothing to copy or restore.
* :func:`offload_params`: the model parameters are copied to host memory and their storage
  freed. With the distributed optimizer these are DDP's flat ``param_data`` buffers (every
  parameter, and the optimizer's fp32 shards of fp32 parameters, are views of them); without
  it, each parameter's own storage. The fp32 main copies that a bf16/fp16 optimizer keeps are
  optimizer parameters, not model parameters, and stay where they are.

Freeing is ``untyped_storage().resize_(0)`` on the tensor that owns the whole storage, so every
view of it (parameters, ``main_grad``, optimizer shards) stays the same Python object and sees
the restored bytes; restoring is ``resize_`` to the original size plus a copy from the host copy.
These steps run on every device: on CPU the "host copy" is a second CPU tensor, so the freed
bytes are really released and a CPU test checks the round trip bit for bit. Only pinning the
host copies, the CUDA synchronisation and ``empty_cache`` are GPU-only (device seam).

Every function reports the bytes it freed or moved: ``sum(numel * element_size)`` of the
tensors concerned. The GPU path has not run on a GPU (see docs/gpu.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch

from k15_megatron.parallel.device import HAVE_CUDA, empty_device_cache
from k15_megatron.rl.optim_reset import reset_optimizer_state, state_tensors


@dataclass
class Offloaded:
    """Tensors whose storage was freed, with the host copies that restore them.

    ``host[i] is None`` means the tensor was freed without a copy and comes back zeroed.
    """

    tensors: List[torch.Tensor] = field(default_factory=list)
    host: List[Optional[torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes freed: sum of numel * element_size over the freed tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def restore(self) -> int:
        """Re-allocate every freed storage and fill it (host copy, or zeros); returns bytes."""
        for tensor, host in zip(self.tensors, self.host):
            tensor.untyped_storage().resize_(_nbytes(tensor))
            if host is None:
                tensor.zero_()
            else:
                tensor.copy_(host, non_blocking=HAVE_CUDA)
        if HAVE_CUDA:
            torch.cuda.synchronize()
        restored = self.nbytes
        self.tensors, self.host = [], []
        return restored


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _owns_storage(tensor: torch.Tensor) -> bool:
    return tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == _nbytes(tensor)


def _free(tensors: List[torch.Tensor], *, keep_copy: bool) -> Offloaded:
    """Free the storage of ``tensors`` (each must own its whole storage), copying first if asked."""
    out, seen = Offloaded(), set()
    for tensor in tensors:
        key = tensor.untyped_storage().data_ptr()
        if _nbytes(tensor) == 0 or key in seen:
            continue
        assert _owns_storage(tensor), (
            f"tensor of shape {tuple(tensor.shape)} is a view into a larger storage; freeing it "
            "would free memory this step does not account for")
        seen.add(key)
        host = None
        if keep_copy:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=HAVE_CUDA)
            host.copy_(tensor, non_blocking=HAVE_CUDA)
        out.tensors.append(tensor)
        out.host.append(host)
    if HAVE_CUDA and keep_copy:
        torch.cuda.synchronize()  # the copies must land before the storage goes
    for tensor in out.tensors:
        tensor.untyped_storage().resize_(0)
    empty_device_cache()
    return out


def _ddp_buffers(model_chunks) -> Iterator:
    for chunk in model_chunks:
        yield from getattr(chunk, "buffers", [])
        yield from getattr(chunk, "expert_parallel_buffers", [])


def release_grad_buffers(model_chunks) -> Offloaded:
    """Free every Megatron DDP gradient buffer (``grad_data``) of ``model_chunks`` without a copy.

    Returns the :class:`Offloaded` record; its ``restore()`` brings the buffers back zeroed.
    """
    return _free([buffer.grad_data for buffer in _ddp_buffers(model_chunks)], keep_copy=False)


def offload_optimizer_states(optimizer) -> Offloaded:
    """Copy every non-scalar state tensor of ``optimizer`` to host memory and free its storage.

    0-dim tensors (torch Adam's ``step``, kept on the host unless capturable/fused) stay.
    Returns the :class:`Offloaded` record; ``restore()`` brings the values back bit for bit.
    """
    return _free([t for _, _, t in state_tensors(optimizer) if t.dim() > 0], keep_copy=True)


def drop_optimizer_states(optimizer) -> int:
    """Discard the optimizer state (``rl.reset_optimizer``: the next update starts from a fresh
    state anyway) and return cached device memory; returns the bytes of state tensors dropped."""
    dropped = reset_optimizer_state(optimizer)
    empty_device_cache()
    return dropped


def offload_params(model_chunks) -> Offloaded:
    """Copy the model parameters of ``model_chunks`` to host memory and free their storage.

    DDP's flat ``param_data`` buffers where they exist (distributed optimizer), else each
    parameter's own storage (see module doc). Returns the :class:`Offloaded` record;
    ``restore()`` brings the values back bit for bit.
    """
    tensors = []
    for buffer in _ddp_buffers(model_chunks):
        if buffer.param_data is not None:
            tensors.append(buffer.param_data)
        else:
            tensors.extend(param.data for param in buffer.params)
    return _free(tensors, keep_copy=True)
