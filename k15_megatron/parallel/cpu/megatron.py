"""Everything needed to run stock Megatron-Core on a machine without CUDA, in one module.

Megatron-Core assumes CUDA in a handful of places. On a CPU-only machine "the CUDA device" can
only mean the CPU, so :func:`apply` maps Megatron's notion of the current accelerator onto it:

1. ``torch.cuda.current_device()`` returns the CPU compute device
   (:func:`k15_megatron.parallel.device.compute_device`), ``torch.cuda.synchronize()`` is a
   no-op and ``Tensor.cuda()`` moves to the compute device (the tensor itself). Megatron allocates buffers
   (``GlobalMemoryBuffer``, DDP grad buffers, p2p shape tensors, rotary frequencies, tied
   embedding sync) through these calls. They are only patched when CUDA is absent, so nothing
   that could have used a GPU is redirected.
2. Factory calls with a literal ``device="cuda"`` (pipeline schedules, optimizer scalars, grad
   clipping, causal masks, the rerun state machine) are rewritten to the CPU by giving exactly
   those modules a ``torch`` namespace whose tensor factories map "cuda" to the compute device.
3. The model-parallel RNG tracker forks the CPU generator instead of CUDA generators, keeping
   Megatron's semantics: a separate, seeded stream per tensor-parallel rank for weight init and
   dropout, restored afterwards.
4. Gradient clipping: Megatron asserts that gradients are ``torch.cuda.FloatTensor``; the CPU
   replacement scales the same gradients by the same coefficient.
5. Mixture of experts: without TE, ``moe_utils`` never binds ``te_general_gemm`` (a NameError
   at the router's first matmul; it is set to None, Megatron's own "absent" value); the
   alltoall dispatcher's device-to-host copies of the split sizes run on a CUDA side stream,
   here a stand-in stream that does nothing (host and device are the same memory), and its
   split sizes become host numbers as they do after CUDA's copy (``maybe_move_tensor_to_cpu``
   moves only CUDA tensors, so they stayed tensors and ``all_to_all_single`` refused them); the
   aux-loss tracker's "cuda" buffers are created on the compute device. Multi-latent attention
   takes Megatron's mock TE classes (importable without TE) for real ones; it is told TE is absent.
6. Checkpoint writing: Megatron's file writer collects its results through a multiprocessing
   Manager started with "spawn" (safe after CUDA initialisation), which re-imports the job's
   modules and made the first save of every process take about 2.6 s on a tiny model. Without
   CUDA the Manager is forked instead, as Megatron already forks its writer processes on every
   save; the files written are the same.

Not covered (and refused by config validation or documented as GPU-only): Transformer Engine
modules, FP8 (context parallelism runs through :mod:`k15_megatron.models.attention`), the distributed
optimizer (it rejects CPU tensors), the shared-expert overlap stream, CUDA graphs.

:func:`apply` is idempotent and is called by
:func:`k15_megatron.parallel.device.prepare_megatron_for_device` only when CUDA is absent.
"""

from __future__ import annotations

import importlib

import torch

from k15_megatron.parallel.device import compute_device

_APPLIED = False

# Modules that create tensors with a literal device="cuda".
_MODULES_WITH_LITERAL_CUDA = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.transformer.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.transformer.moe.moe_utils",
)

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "as_tensor")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CpuTorchNamespace:
    """Stands in for the ``torch`` module inside one Megatron module: tensor factories called
    with a CUDA device create CPU tensors, and ``pin_memory=True`` (which needs an accelerator;
    RoPE's context-parallel slicing asks for it) is dropped; every other attribute is torch's
    own."""

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = compute_device()
            kwargs.pop("pin_memory", None)
            return attr(*args, **kwargs)

        return factory


def _cpu_current_device():
    return compute_device()


def _noop(*args, **kwargs):
    return None


def _tensor_cuda_is_identity(self, *args, **kwargs):
    return self.to(compute_device())


def _patch_cuda_namespace() -> None:
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _noop
    torch.Tensor.cuda = _tensor_cuda_is_identity


def _patch_literal_cuda_modules() -> None:
    namespace = _CpuTorchNamespace()
    for module_name in _MODULES_WITH_LITERAL_CUDA:
        module = importlib.import_module(module_name)
        module.torch = namespace


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """Megatron's RNG tracker, seeded streams kept as CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

    mp_random._get_cuda_rng_state = get_rng_state
    mp_random._set_cuda_rng_state = set_rng_state
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Megatron seeds its default stream with torch.cuda.manual_seed; on CPU that stream is torch's.
    mp_random.torch = _SeedRedirectingTorch()
    mp_random.initialize_rng_tracker(force_reset=True)


class _SeedRedirectingTorch(_CpuTorchNamespace):
    """``torch`` inside Megatron's RNG module: ``torch.cuda.manual_seed`` seeds the CPU generator."""

    class _Cuda:
        def __getattr__(self, name):
            if name == "manual_seed":
                return torch.manual_seed
            return getattr(torch.cuda, name)

    cuda = _Cuda()


def _patch_grad_clipping() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grad_attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, grad_attr) for p in parameters if getattr(p, grad_attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for grad in grads:
                grad.detach().mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


class _NoStream:
    """A CUDA stream / event stand-in where every operation is already complete."""

    def wait_stream(self, stream):
        return None

    def record_event(self, event=None):
        return self

    def synchronize(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _StreamlessCuda:
    """``torch.cuda`` inside the MoE token dispatcher: streams that do nothing."""

    _stream = _NoStream()

    def Stream(self, *args, **kwargs):  # noqa: N802 (torch's name)
        return self._stream

    def current_stream(self, *args, **kwargs):
        return self._stream

    def stream(self, stream):
        return self._stream

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _DispatcherTorch(_CpuTorchNamespace):
    cuda = _StreamlessCuda()


def _host_numbers(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Megatron's ``maybe_move_tensor_to_cpu`` for a machine whose tensors are all on the host:
    the split sizes become a numpy array (``as_numpy``) as after CUDA's copy."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


def _patch_moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    token_dispatcher.torch = _DispatcherTorch()
    token_dispatcher.maybe_move_tensor_to_cpu = _host_numbers


def _patch_mla() -> None:
    """Multi-latent attention decides it has Transformer Engine when importing Megatron's TE
    extension succeeds, which it does without TE (that module then holds mock classes), and
    ``isinstance(linear_proj, TELinear)`` fails on the mock. Tell it the truth."""
    from megatron.core.transformer import multi_latent_attention

    from k15_megatron.parallel.device import HAVE_TE

    if not HAVE_TE:
        multi_latent_attention.HAVE_TE = False


def _patch_checkpoint_writer_queue() -> None:
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def write_results_queue():
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = write_results_queue


def apply() -> None:
    """Install the CPU redirections described in the module docstring (once per process)."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("k15_megatron.parallel.cpu.megatron.apply() must not run on a machine with CUDA")
    _patch_cuda_namespace()
    _patch_literal_cuda_modules()
    _patch_rng_tracker()
    _patch_grad_clipping()
    _patch_moe()
    _patch_mla()
    _patch_checkpoint_writer_queue()
    _APPLIED = True
