"""Distributed start-up: launch-environment parsing, the device seam, and Megatron's RNG streams."""

import pytest
import torch
from distributed import run_distributed

from k15_megatron.parallel import device
from k15_megatron.parallel.initialize import first_host_of_nodelist, launch_env_from_environ


def test_torchrun_environment_wins():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}
    launch = launch_env_from_environ(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 8, 1, "torchrun")
    assert (launch.master_addr, launch.master_port) == ("n1", 1234)


def test_srun_step_without_torchrun():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16",
           "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[007-008,010]", "SLURM_JOB_ID": "4242"}
    launch = launch_env_from_environ(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 16, 5, "slurm")
    assert launch.master_addr == "gpu007"
    assert launch.master_port == 20000 + 4242


def test_sbatch_script_alone_is_a_single_process():
    # SLURM_PROCID is set inside a batch script too, but without an srun step there is one process.
    launch = launch_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "a1"})
    assert (launch.world_size, launch.launcher) == (1, "single")


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"), ("node[1-4]", "node1"), ("gpu[003,005-009],cpu1", "gpu003"),
    ("a-b-01,a-b-02", "a-b-01"), ("rack[2-3]-n[01-02]", "rack2-n[01-02]"),
])
def test_first_host_of_nodelist(nodelist, first):
    assert first_host_of_nodelist(nodelist) == first


def test_backend_choice_on_this_machine():
    assert device.distributed_backend("auto") == ("nccl" if device.HAVE_CUDA else "gloo")
    if not device.HAVE_CUDA:
        with pytest.raises(ValueError, match="parallel.backend=nccl"):
            device.distributed_backend("nccl")
    with pytest.raises(ValueError, match="parallel.backend='mpi'"):
        device.distributed_backend("mpi")


def _rng_worker(rank, world_size, seed):
    from megatron.core import tensor_parallel

    from k15_megatron.config import ParallelConfig
    from k15_megatron.parallel.initialize import initialize

    layout = initialize(ParallelConfig(tensor=2), seed=seed)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        tp_draw = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork() must restore the default stream"
    default_draw = torch.rand(4)
    return layout.tp_rank, tp_draw, default_draw, str(torch.cuda.current_device())


@pytest.mark.distributed
@pytest.mark.skipif(device.HAVE_CUDA, reason="checks the CPU redirections, which are off with CUDA")
def test_megatron_rng_streams_on_cpu():
    first = run_distributed(_rng_worker, 2, 11)
    again = run_distributed(_rng_worker, 2, 11)
    (_, tp0, d0, dev0), (_, tp1, d1, _) = first
    assert dev0 == "cpu"
    assert not torch.equal(tp0, tp1), "tensor-parallel ranks must draw from different streams"
    assert torch.equal(d0, d1), "the data-parallel (default) stream is the same on every TP rank"
    for (_, a_tp, a_d, _), (_, b_tp, b_d, _) in zip(first, again):
        assert torch.equal(a_tp, b_tp) and torch.equal(a_d, b_d), "same seed must reproduce the streams"


_SRUN_RANK_SCRIPT = r"""
import json, sys
from k15_megatron.config import ParallelConfig
from k15_megatron.parallel.initialize import initialize, launch_env_from_environ, shutdown
launch = launch_env_from_environ()
layout = initialize(ParallelConfig(tensor=2), seed=3)
print(json.dumps({"launcher": launch.launcher, "rank": layout.rank, "tp_rank": layout.tp_rank,
                  "world": layout.world_size}))
shutdown()
"""


@pytest.mark.distributed
def test_initialize_from_srun_variables_without_torchrun():
    """Two processes that only carry the variables an srun step sets (no RANK/WORLD_SIZE)."""
    import json
    import os
    import subprocess
    import sys

    from distributed import free_port

    port = free_port()
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    procs = []
    for rank in range(2):
        env = dict(base, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_ID="0",
                   SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", _SRUN_RANK_SCRIPT], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["launcher"] for r in results] == ["slurm", "slurm"]
    assert sorted((r["rank"], r["tp_rank"]) for r in results) == [(0, 0), (1, 1)]
    assert all(r["world"] == 2 for r in results)
