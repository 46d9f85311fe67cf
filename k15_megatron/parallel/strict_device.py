"""Strict device mode: on a CPU-only machine, fail where a GPU run would fail on a host tensor.

On a GPU a tensor built on the host (``torch.tensor(list)``, ``torch.arange(n)``) and handed to
Megatron or to an NCCL collective is an error; on the CPU the same code runs, because host and
compute device are the same memory. This mode gives every tensor of the process one of two
placements and enforces CUDA's rules between them:

* compute device: created with ``device=compute_device()`` (the one instance
  :func:`k15_megatron.parallel.device.compute_device` returns; Megatron's CUDA allocations are
  redirected to it by :mod:`k15_megatron.parallel.cpu.megatron`), moved there with
  ``.to(compute_device())`` / ``.cuda()`` / :func:`~k15_megatron.parallel.device.to_device`,
  derived from such a tensor, or created where the mode cannot see it (parameters, gradients,
  tensors made by C++ code);
* host: created by a tensor factory without a device or with any other CPU device object
  (``torch.tensor(rows)``, ``torch.zeros(n)``, ``torch.arange(n)``, ``torch.load``), moved with
  ``.cpu()`` / ``.to("cpu")``, or computed from host tensors only.

Enforced, as on CUDA:

1. an operation that mixes a host tensor of one or more dimensions with a compute-device tensor
   raises :class:`StrictDeviceError` (0-dim host tensors are allowed, as CUDA allows CPU scalars;
   copies, indexing and ``.to`` may cross);
2. a tensor collective (all_reduce, broadcast, all_gather, reduce_scatter, all_to_all, send/recv,
   ...) called from k15_megatron code with a host tensor on a group that is NCCL on GPU (every
   group but those created with ``backend="gloo"``) raises;
3. Megatron's ``GPTModel.forward`` refuses host ``input_ids``, ``position_ids``,
   ``attention_mask`` or ``labels``.

Rules 1 and 3 apply while k15_megatron code is on the call stack, rule 2 to collectives that
k15_megatron code calls: test code may still drive Megatron with host tensors or compare device
results with host references, as it would in a CPU-only test.

vLLM keeps its own placement (it is a separate engine with its own device handling), so its
``LLM`` methods run outside the mode; the weight stream vLLM pulls during ``collective_rpc`` is
still checked.

What it proves: no host tensor reaches Megatron, a collective of k15 code, or an operation with
device tensors, on the code paths the tests run. What it cannot: CUDA kernels, streams, memory,
NCCL itself, host tensors that only exist on paths no test runs, or Megatron-Core's own
placements (stock Megatron-Core places its own tensors).

Enabled by ``K15_STRICT_DEVICE=1`` (:func:`k15_megatron.parallel.device.prepare_megatron_for_device`
calls :func:`enable`); the test suite sets it for every process it starts. Used only on CPU.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

import torch
from torch.overrides import TorchFunctionMode, resolve_name

from k15_megatron.parallel.device import compute_device

_HOST_TAG = "_k15_on_host"


class StrictDeviceError(RuntimeError):
    """A host tensor where a GPU run needs a compute-device tensor."""


def is_host(tensor) -> bool:
    """True if ``tensor`` is a host tensor under the strict mode's rules (module docstring)."""
    return isinstance(tensor, torch.Tensor) and getattr(tensor, _HOST_TAG, False)


def _describe(tensor: torch.Tensor) -> str:
    return f"host tensor {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _in_job_code() -> bool:
    """True if k15_megatron code (other than this module) is on the call stack: the checks apply
    to what the package does, not to tests that drive Megatron or compare results directly."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("k15_megatron.") and name != __name__:
            return True
        frame = frame.f_back
    return False


def _caller() -> str:
    """file:line of the innermost k15_megatron frame (else the innermost non-torch frame)."""
    frame, fallback = sys._getframe(2), None
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("k15_megatron") and name != __name__:
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        if fallback is None and not name.startswith(("torch", __name__)):
            fallback = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


# ---------------------------------------------------------------------------------------------
# Placement of tensors
# ---------------------------------------------------------------------------------------------
_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy, torch.zeros, torch.ones,
    torch.empty, torch.full, torch.arange, torch.range, torch.linspace, torch.logspace, torch.eye,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.empty_strided, torch.tril_indices,
    torch.triu_indices, torch.scalar_tensor,
}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
         torch.randn_like, torch.randint_like, torch.Tensor.new_zeros, torch.Tensor.new_ones,
         torch.Tensor.new_empty, torch.Tensor.new_full, torch.Tensor.new_tensor}
# Operations that CUDA allows across devices.
_CROSSING = {torch.Tensor.copy_, torch.Tensor.__setitem__, torch.Tensor.__getitem__, torch.Tensor.to,
             torch.Tensor.set_, torch.Tensor.index_put_, torch.Tensor.cpu, torch.Tensor.pin_memory}
_DEVICE_DESCRIPTOR = torch._C.TensorBase.__dict__["device"]


def _host_device(device) -> bool:
    """Whether a factory's ``device`` argument means the host."""
    if device is None:
        return torch.get_default_device().type == "cpu"
    if device is compute_device():
        return False
    if isinstance(device, int):  # a CUDA ordinal
        return False
    return torch.device(device).type == "cpu"


def _tensors(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def _tag(result, host: bool):
    if isinstance(result, torch.Tensor):
        # Only host tensors carry the attribute (the common device case stays cheap).
        if host or getattr(result, _HOST_TAG, False):
            setattr(result, _HOST_TAG, host)
    elif isinstance(result, (list, tuple)):
        for value in result:
            _tag(value, host)
    return result


def _to_target_is_host(args, kwargs):
    """For ``Tensor.to``: True/False if it names a host/compute target, None if only a dtype."""
    for value in (*args[1:], kwargs.get("device"), kwargs.get("other")):
        if isinstance(value, torch.Tensor):
            return is_host(value)
        if isinstance(value, (torch.device, str, int)) and not isinstance(value, bool):
            return _host_device(value)
    return None


class _PlacementMode(TorchFunctionMode):
    """Tracks placements and raises on host/compute-device mixing (module docstring, rule 1)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if getattr(func, "__self__", None) is _DEVICE_DESCRIPTOR:  # tensor.device
            real = func(*args)
            if real.type != "cpu":  # e.g. meta tensors (transformers' lazy init)
                return real
            return real if is_host(args[0]) else compute_device()
        if func in _FACTORIES:
            return _tag(func(*args, **kwargs), _factory_is_host(args, kwargs))
        if func in _LIKE:
            host = _host_device(kwargs["device"]) if "device" in kwargs else is_host(args[0])
            return _tag(func(*args, **kwargs), host)
        if func is torch.Tensor.to:
            return self._move(args, kwargs, _to_target_is_host(args, kwargs))
        if func is torch.Tensor.cpu:
            return self._move(args, {}, True)
        if func is torch.Tensor.__iter__:
            return iter(_tag(list(args[0].unbind(0)), is_host(args[0])))
        num_tensors, host = 0, []
        for value in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(value, torch.Tensor):
                num_tensors += 1
                if getattr(value, _HOST_TAG, False):
                    host.append(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, torch.Tensor):
                        num_tensors += 1
                        if getattr(item, _HOST_TAG, False):
                            host.append(item)
        if host and len(host) < num_tensors and func not in _CROSSING:
            wide = [t for t in host if t.dim() > 0]
            if wide and _in_job_code():
                name = resolve_name(func) or getattr(func, "__name__", repr(func))
                raise StrictDeviceError(
                    f"{name} mixes a {_describe(wide[0])} with compute-device tensors at {_caller()}; "
                    "on a GPU this fails: create it on compute_device() or move it with to_device()")
        result = func(*args, **kwargs)
        if not num_tensors or (args and result is args[0]) or _in_place(func):
            return result  # in place: the tensor keeps its placement
        if func is torch.Tensor.__getitem__:
            return _tag(result, is_host(args[0]))
        return _tag(result, len(host) == num_tensors)

    @staticmethod
    def _move(args, kwargs, target_host):
        source = args[0]
        result = torch.Tensor.to(*args, **kwargs) if kwargs or len(args) > 1 else source
        if target_host is None or target_host == is_host(source):
            return result if result is source else _tag(result, is_host(source))
        if result is source:  # same memory on this machine; a different tensor on a GPU
            result = source.view_as(source)
        return _tag(result, target_host)


_IN_PLACE: dict = {}


def _in_place(func) -> bool:
    known = _IN_PLACE.get(func)
    if known is None:
        name = getattr(func, "__name__", "")
        known = _IN_PLACE[func] = name.endswith("_") and not name.endswith("__")
    return known


def _factory_is_host(args, kwargs) -> bool:
    data = args[0] if args else kwargs.get("data")
    if "device" not in kwargs and isinstance(data, torch.Tensor):
        return is_host(data)
    return _host_device(kwargs.get("device"))


# ---------------------------------------------------------------------------------------------
# Collectives and Megatron's forward
# ---------------------------------------------------------------------------------------------
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "reduce", "gather",
                "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv")
_HOST_GROUPS: set[int] = set()  # ids of groups created with backend="gloo" (gloo on GPU too)


def _group_of(args, kwargs):
    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, torch.distributed.ProcessGroup)), None)
    return group


def _checked_collective(name, original):
    @functools.wraps(original)
    def collective(*args, **kwargs):
        # Called by k15 code itself (not by Megatron, vLLM, or torch's own dispatch through the mode).
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if (caller.startswith("k15_megatron") and caller != __name__
                and id(_group_of(args, kwargs)) not in _HOST_GROUPS):
            values = list(_tensors(args, kwargs))
            if name == "batch_isend_irecv":
                values = [op.tensor for op in args[0]]
            for value in values:
                if is_host(value):
                    raise StrictDeviceError(
                        f"torch.distributed.{name} got a {_describe(value)} at {_caller()}; on a GPU "
                        "this group is NCCL, which takes compute-device tensors only: create it on "
                        "collective_device(group)")
        return original(*args, **kwargs)

    return collective


def _recording_new_group(original):
    @functools.wraps(original)
    def new_group(*args, **kwargs):
        group = original(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if str(backend).lower() == "gloo" and group is not None:
            _HOST_GROUPS.add(id(group))
        return group

    return new_group


def _check_forward_inputs(forward):
    names = ("input_ids", "position_ids", "attention_mask", "decoder_input", "labels")

    @functools.wraps(forward)
    def checked(self, *args, **kwargs):
        named = {**dict(zip(names, args)), **kwargs}
        for key, value in named.items():
            if is_host(value) and _in_job_code():
                raise StrictDeviceError(
                    f"Megatron GPTModel.forward got {key} as a {_describe(value)} (from {_caller()}); "
                    "on a GPU Megatron needs it on the compute device: pass micro-batches through "
                    "k15_megatron.parallel.device.to_device")
        return forward(self, *args, **kwargs)

    return checked


# ---------------------------------------------------------------------------------------------
# vLLM runs outside the mode
# ---------------------------------------------------------------------------------------------
_VLLM_UNCHECKED = ("__init__", "generate", "enqueue", "chat", "encode", "sleep", "wake_up", "reset_prefix_cache")
_VLLM_ENGINE_UNCHECKED = ("step",)  # LLMEngine.step: the rollout engine steps it to see requests finish


def _outside_mode(method):
    @functools.wraps(method)
    def unchecked(*args, **kwargs):
        if not _mode_on_top():
            return method(*args, **kwargs)
        _MODE.__exit__(None, None, None)
        try:
            return method(*args, **kwargs)
        finally:
            _MODE.__enter__()

    return unchecked


def _mode_on_top() -> bool:
    from torch.overrides import _get_current_function_mode_stack

    stack = _get_current_function_mode_stack()
    return _MODE is not None and bool(stack) and stack[-1] is _MODE


def _patch_vllm(module) -> None:
    from vllm.v1.engine.llm_engine import LLMEngine  # imported by vllm.entrypoints.llm already

    for cls, names in ((module.LLM, _VLLM_UNCHECKED), (LLMEngine, _VLLM_ENGINE_UNCHECKED)):
        for name in names:
            method = cls.__dict__.get(name)
            if callable(method):
                setattr(cls, name, _outside_mode(method))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` right after ``module_name`` is first imported."""

    def __init__(self, module_name: str, callback):
        self.module_name, self.callback = module_name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original, callback = spec.loader.exec_module, self.callback

        def exec_module(module):
            original(module)
            callback(module)

        spec.loader.exec_module = exec_module
        return spec


# ---------------------------------------------------------------------------------------------
_MODE: _PlacementMode | None = None


def enabled() -> bool:
    """True once :func:`enable` ran in this process."""
    return _MODE is not None


def enable() -> None:
    """Switch this process (its main thread) into the strict device mode. Idempotent; CPU only."""
    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the strict device mode simulates a GPU on CPU-only machines; this one has CUDA")
    from torch.distributed import distributed_c10d

    # Both namespaces: P2POp compares its op with distributed_c10d.isend / irecv.
    for name in _COLLECTIVES:
        original = getattr(distributed_c10d, name, None)
        if original is not None:
            checked = _checked_collective(name, original)
            setattr(distributed_c10d, name, checked)
            setattr(torch.distributed, name, checked)
    distributed_c10d.new_group = torch.distributed.new_group = _recording_new_group(distributed_c10d.new_group)
    from megatron.core.models.gpt import gpt_model

    gpt_model.GPTModel.forward = _check_forward_inputs(gpt_model.GPTModel.forward)
    if "vllm.entrypoints.llm" in sys.modules:
        _patch_vllm(sys.modules["vllm.entrypoints.llm"])
    elif importlib.util.find_spec("vllm") is not None:
        sys.meta_path.insert(0, _PatchOnImport("vllm.entrypoints.llm", _patch_vllm))
    _MODE = _PlacementMode()
    _MODE.__enter__()
