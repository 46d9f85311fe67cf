"""Distributed start-up: one entry for torchrun, srun without torchrun, and a single process.

``initialize(parallel_cfg, seed=...)`` does, in order:

1. read the launch environment (:func:`launch_env_from_environ`): torchrun's RANK/WORLD_SIZE/
   LOCAL_RANK/MASTER_ADDR/MASTER_PORT, else an srun step's SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID with
   the master taken from the first host of SLURM_JOB_NODELIST, else a single process;
2. prepare the device (:mod:`k15_megatron.parallel.device`): bind the local GPU, or on CPU apply
   the Megatron-Core redirections;
3. ``torch.distributed.init_process_group`` with NCCL on GPU, gloo on CPU (unless already up);
4. Megatron's ``parallel_state.initialize_model_parallel`` with the configured TP/PP/CP/EP;
5. seed every RNG Megatron uses (per tensor-parallel rank streams included).

It returns a :class:`ParallelLayout` describing this rank's place in the grid, which callers pass
down instead of reaching for globals.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
import re
import socket

import numpy as np
import torch

from k15_megatron.parallel import device


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """How this process was launched: its global rank, the world size, and the rendezvous."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """This rank's coordinates in the (DP, CP, PP, TP) grid; sizes are group sizes."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_size: int
    dp_rank: int
    dp_size: int
    ep_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    def describe(self) -> str:
        """The layout in one phrase, e.g. ``TP=2 PP=1 CP=2 DP=1 (4 processes)``; expert
        parallelism (carved from DP x CP) is named when on: ``TP=1 PP=1 CP=1 EP=2 DP=2 (2 processes)``."""
        expert = f" EP={self.ep_size}" if self.ep_size > 1 else ""
        return (f"TP={self.tp_size} PP={self.pp_size} CP={self.cp_size}{expert} DP={self.dp_size} "
                f"({self.world_size} process{'es' if self.world_size > 1 else ''})")

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def first_host_of_nodelist(nodelist: str) -> str:
    """The first host name of a Slurm node list, e.g. ``gpu[003-005,009],cpu1`` -> ``gpu003``."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    first_range = ranges.split(",")[0]
    return prefix + first_range.split("-")[0] + suffix


def launch_env_from_environ(environ=None) -> LaunchEnv:
    """Read the launch variables of torchrun, else of Slurm (srun), else assume one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    # Inside an sbatch script SLURM_PROCID is set too; only an srun step (SLURM_STEP_ID) is a launch.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist and "MASTER_ADDR" not in env:
            raise ValueError("launched by srun but neither SLURM_JOB_NODELIST nor MASTER_ADDR is set")
        # A port derived from the job id lets several jobs share a node without colliding.
        default_port = 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host_of_nodelist(nodelist),
            master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="slurm",
        )
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
    return LaunchEnv(0, 1, 0, "127.0.0.1", port, "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(launch: LaunchEnv, backend: str, timeout_minutes: int) -> None:
    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != launch.world_size:
            raise ValueError(
                f"torch.distributed is already initialised with world size "
                f"{torch.distributed.get_world_size()}, but the launcher says {launch.world_size}"
            )
        return
    # torchrun's env:// rendezvous reads these; srun does not set them.
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    torch.distributed.init_process_group(
        backend=backend,
        init_method="env://",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG streams.

    The data-parallel stream gets ``seed`` (the same on every rank); Megatron derives the
    tensor-parallel and expert streams from it per rank.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(parallel_cfg, *, seed: int = 1234, timeout_minutes: int = 30) -> ParallelLayout:
    """Start torch.distributed and Megatron's parallel state; see the module docstring.

    ``parallel_cfg`` is the ``parallel`` section of the experiment config (tensor, pipeline,
    context, expert sizes and the backend). Calling it again with the same sizes is a no-op
    apart from re-seeding.
    """
    from megatron.core import parallel_state

    launch = launch_env_from_environ()
    model_parallel = parallel_cfg.tensor * parallel_cfg.pipeline * parallel_cfg.context
    if launch.world_size % model_parallel:
        raise ValueError(
            f"world size {launch.world_size} ({launch.launcher}) is not divisible by "
            f"parallel.tensor*parallel.pipeline*parallel.context = {model_parallel}"
        )
    device.prepare_megatron_for_device()
    _init_process_group(launch, device.distributed_backend(parallel_cfg.backend), timeout_minutes)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel_cfg.tensor,
            pipeline_model_parallel_size=parallel_cfg.pipeline,
            context_parallel_size=parallel_cfg.context,
            expert_model_parallel_size=parallel_cfg.expert,
        )
    seed_everything(seed)
    return current_layout()


def current_layout() -> ParallelLayout:
    """The layout of this rank, read from Megatron's initialised parallel state."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        cp_size=ps.get_context_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        ep_size=ps.get_expert_model_parallel_world_size(),
    )


def shutdown() -> None:
    """Tear down Megatron's parallel state and the process group (safe to call twice, and after
    a colocated vLLM engine's own teardown has already destroyed the process-wide groups)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        try:
            parallel_state.destroy_model_parallel()
        except (ValueError, RuntimeError):  # groups already destroyed by vLLM's teardown
            pass
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def global_rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    """A barrier over all ranks (nothing without torch.distributed)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
