"""Building the vLLM engine from the ``rollout`` config, inside the training processes.

The engine is colocated: it lives in the same processes that hold the Megatron model, so the
weight sync hands tensors over in memory (``llm.collective_rpc``) and nothing goes to disk.
Decisions made here, once:

* Process layout. When torch.distributed is initialised with world size W > 1 (torchrun /
  srun), every rank creates the engine with ``distributed_executor_backend=
  "external_launcher"``: vLLM joins the existing processes instead of spawning workers.
  ``rollout.tensor_parallel_size`` = T must divide W; vLLM then runs D = W / T engine replicas
  (``data_parallel_size=D``; replica r holds ranks r*T .. r*T + T-1), each generating its own
  requests. T = W gives one engine spanning all ranks. D > 1 is not optional: T = 1 on 2 ranks
  without it fails inside vLLM's gloo set-up ("rank < size. 1 vs 1"). Ranks of one replica
  must pass identical requests; replicas get different engine seeds (seed + replica index) so
  they never share random streams. Without torch.distributed (or W = 1): a plain in-process
  engine.
* In-process engine core: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set before the engine is
  built (external_launcher forces it too), so ``collective_rpc`` reaches the worker objects in
  this process.
* CPU specifics: float32 for ``dtype=auto``, eager execution, a fixed KV cache of
  ``cpu_kv_cache_gib`` (vLLM's utilisation-based sizing on CPU reserves a fraction of the
  whole NUMA node and fails on shared machines). Under external_launcher, vLLM's CPU
  shared-memory segments get a per-job name (``_cpu_shm_named_after``), so several jobs or
  test runs can hold TP engines on one machine at once; segments left by killed jobs are
  unlinked (``remove_stale_cpu_shm_segments``).
* oneDNN primitive cache: vLLM's CPU matmuls build one oneDNN primitive per input shape, and
  every scheduler step brings new token counts. oneDNN's process-wide cache keeps up to 1024 of
  them (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), on top of the per-layer caches vLLM keeps itself;
  a long run's resident memory climbed by about 1 MiB per iteration of 16 requests while it
  filled (docs/memory.md). ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` defaults to
  ``ONEDNN_CACHE_CAPACITY`` here; a value already in the environment wins.
* Multi-latent attention (DeepSeek-V3) on the CPU: the reference MLA backend for float32 and a
  RoPE redirection (:mod:`k15_megatron.parallel.cpu.vllm_mla`).
* Repeat stop: the logits processor of :mod:`k15_megatron.rollout.repeat_stop` is registered,
  so looping responses are cut while they are generated.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from k15_megatron.config.rollout import RolloutConfig
from k15_megatron.parallel.cpu import vllm_mla
from k15_megatron.rollout.repeat_stop import REPEAT_STOP_PROCESSOR

_GIB = 1 << 30
_REPLICA_SEED_STRIDE = 1_000_003  # replicas' engine seeds differ by a large prime
ONEDNN_CACHE_CAPACITY = 64
"""Default of ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (oneDNN's own default is 1024 primitives)."""


@dataclass(frozen=True)
class EngineLayout:
    """Where this process sits in the rollout engine's layout (see the module doc)."""

    world_size: int
    """Processes that together hold all engine replicas (1 = no torch.distributed)."""
    rank: int
    """This process's global rank."""
    tensor_parallel_size: int
    """Ranks per engine replica."""
    data_parallel_size: int
    """Engine replicas (world_size / tensor_parallel_size)."""

    @property
    def data_parallel_rank(self) -> int:
        """Index of the replica this rank belongs to: requests are split by it."""
        return self.rank // self.tensor_parallel_size

    @property
    def spmd(self) -> bool:
        """True when the engine joins existing processes (external_launcher)."""
        return self.world_size > 1


def engine_layout(cfg: RolloutConfig, *, world_size: int, rank: int) -> EngineLayout:
    """The layout for ``world_size`` processes; ValueError if the sizes do not fit."""
    tp = cfg.tensor_parallel_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    if tp < 1 or world_size % tp:
        raise ValueError(f"rollout.tensor_parallel_size={tp} must divide the world size "
                         f"{world_size} (each engine replica spans tensor_parallel_size ranks)")
    return EngineLayout(world_size=world_size, rank=rank, tensor_parallel_size=tp,
                        data_parallel_size=world_size // tp)


def current_layout(cfg: RolloutConfig) -> EngineLayout:
    """The layout of this process: from torch.distributed when it is initialised, else 1 rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return engine_layout(cfg, world_size=dist.get_world_size(), rank=dist.get_rank())
    return engine_layout(cfg, world_size=1, rank=0)


def llm_kwargs(cfg: RolloutConfig, *, model_path: str, seed: int, layout: EngineLayout,
               on_cpu: bool) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for this config, layout and device (pure function)."""
    dtype = cfg.dtype
    if dtype == "auto" and on_cpu:
        dtype = "float32"
    kwargs: dict[str, Any] = dict(
        model=model_path,
        dtype=dtype,
        seed=seed + _REPLICA_SEED_STRIDE * layout.data_parallel_rank,
        max_model_len=cfg.max_model_len,
        tensor_parallel_size=layout.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enforce_eager=True if on_cpu else cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        max_num_seqs=cfg.max_num_seqs,
        logprobs_mode=cfg.logprobs_mode,
        logits_processors=[REPEAT_STOP_PROCESSOR],
        # vLLM's weight-loading bar passes tqdm an explicit switch; follow tqdm's own variable
        # (set by a quiet k15 command, k15_megatron/jobs/verbosity.py).
        use_tqdm_on_load=os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true"),
    )
    if cfg.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    if on_cpu:
        kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_gib * _GIB)
    else:
        # The hybrid engine puts vLLM to sleep while Megatron trains (CUDA only).
        kwargs["enable_sleep_mode"] = True
    if layout.spmd:
        kwargs["distributed_executor_backend"] = "external_launcher"
        if layout.data_parallel_size > 1:
            kwargs["data_parallel_size"] = layout.data_parallel_size
    return kwargs


def remove_stale_cpu_shm_segments(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink vLLM CPU shared-memory segments that no live process maps; returns their names.

    vLLM's CPU backend names the segments of its SPMD groups after the rank list only
    (``-tp:0-[0-1]-cpushm_0`` under external_launcher). A job killed with SIGKILL leaves them
    behind (their memory stays taken until reboot). A segment still mapped by some process
    belongs to a running engine and is left alone. Engines built here never reuse an old name
    (``_cpu_shm_named_after``), so this only reclaims memory.
    """
    if not os.path.isdir(shm_dir):
        return []
    candidates = [n for n in os.listdir(shm_dir) if "-cpushm_" in n]
    if not candidates:
        return []
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            continue
        mapped.update(n for n in candidates if f"{shm_dir}/{n}" in maps)
    removed = []
    for name in candidates:
        if name not in mapped:
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _clear_stale_segments_once_per_node() -> None:
    """Local rank 0 removes stale segments while the node's other ranks wait."""
    import torch.distributed as dist

    if int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) == 0:
        removed = remove_stale_cpu_shm_segments()
        if removed:
            import logging

            logging.getLogger(__name__).warning("removed stale vLLM CPU shared memory: %s", removed)
    dist.barrier()


def _job_token() -> str:
    """A random token, the same on every rank (broadcast from rank 0 over the default group)."""
    import torch.distributed as dist

    token = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    return token[0]


@contextlib.contextmanager
def _cpu_shm_named_after(token: str):
    """Make vLLM's CPU shared-memory segments of this engine unique to this job.

    The CPU worker names its TP/PP segments after its ``distributed_init_method``, which the
    external launcher hard-codes as "env://": every engine on the machine gets the same names,
    so a second engine running at the same time (another job, a concurrent test run) fails
    with "create shm in SHMManager failed. errno: 17". While the engine is built, the launcher
    reports "env://k15-<token>" instead; the worker keeps what follows the last ':' (the token)
    as its segment prefix. torch.distributed is already initialised at this point, so vLLM
    uses the string for nothing else.
    """
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    original = ExecutorWithExternalLauncher._distributed_args

    def distributed_args(self):
        method, rank, local_rank = original(self)
        return f"{method}k15-job:{token}", rank, local_rank

    ExecutorWithExternalLauncher._distributed_args = distributed_args
    try:
        yield
    finally:
        ExecutorWithExternalLauncher._distributed_args = original


def build_llm(cfg: RolloutConfig, *, model_path: str, seed: int,
              layout: Optional[EngineLayout] = None):
    """Create the ``vllm.LLM`` of this process (every rank calls it, SPMD).

    Args:
        cfg: the ``rollout`` section.
        model_path: Hugging Face folder (config, tokenizer, weights; the weights may be
            replaced in place later by the weight sync).
        seed: the experiment's root seed.
        layout: default ``current_layout(cfg)``.

    Returns:
        ``(llm, layout)``.
    """
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ValueError(f"rollout model folder {model_path!r} has no config.json")
    layout = layout or current_layout(cfg)
    # Set before vLLM reads its environment: the engine core must live in this process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # Read by oneDNN when its primitive cache is first used, i.e. by vLLM's first matmul.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    if layout.spmd and on_cpu_platform():
        _clear_stale_segments_once_per_node()
    from vllm import LLM
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    kwargs = llm_kwargs(cfg, model_path=model_path, seed=seed, layout=layout, on_cpu=on_cpu)
    if on_cpu and vllm_mla.is_mla_model(model_path):
        kwargs.update(vllm_mla.engine_kwargs(dtype=kwargs["dtype"]))
        vllm_mla.apply()
    if not (layout.spmd and on_cpu):
        return LLM(**kwargs), layout
    with _cpu_shm_named_after(_job_token()):
        return LLM(**kwargs), layout
