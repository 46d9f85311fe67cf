"""Preemption of a real 2-process `k15 sft` (gloo, CPU) through every way a job is signalled.

Each job trains the tiny model with a checkpoint every 2 steps (so the checkpoint writer's helper
processes exist when the signal comes: a SIGTERM/SIGUSR1 that killed them broke the save with a
BrokenPipeError) and is signalled once that first checkpoint is there:

* ``parent``: SIGTERM to the `k15` process only (it forwards to its ranks);
* ``group``: SIGTERM to the `k15` process group (kill -- -PGID);
* ``torchrun``: SIGTERM to a torchrun the user started (it forwards to its workers' groups);
* ``srun``: ranks started the way an srun step starts them (SLURM_* variables, no launcher
  process), and, as Slurm's ``--signal=USR1@T`` followed by its time limit does, SIGUSR1 and
  then SIGTERM to every process of the step, helpers included.

Then: the launched processes exit 0 (torchrun itself exits non-zero: torch re-raises the
signal), no process of the job is left, one complete checkpoint at the last logged step (no
iteration lost), no ``.tmp``. The ``parent`` run is started again and resumes from that
checkpoint to the end, ignoring and then removing leftovers of a killed save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from distributed import free_port
from tooling import REPO_ROOT

from k15_megatron.checkpoint import run_ckpt

SAVE_INTERVAL = 2


def _write_data(path) -> str:
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"{i}+{i + 1}=", "response": f"{2 * i + 1}"}) + "\n")
    return str(path)


def _sft_args(run_dir, data, *, iters: int) -> list[str]:
    return ["sft", "examples/tiny_arith_sft.yaml", f"run_dir={run_dir}", f"data.train_path={data}",
            "parallel.world_size=2", f"optim.train_iters={iters}", "optim.lr_warmup_iters=1",
            "optim.lr_decay_iters=100000", "logging.log_interval=1", "data.global_batch_size=4", "data.micro_batch_size=2",
            f"checkpoint.save_interval={SAVE_INTERVAL}", "checkpoint.keep_last=0"]


class _Output:
    """Collects the merged stdout/stderr of some processes on a thread."""

    def __init__(self, procs):
        self.lines: list[str] = []
        self.threads = [threading.Thread(target=self._read, args=(p,), daemon=True) for p in procs]
        for t in self.threads:
            t.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        for t in self.threads:
            t.join(timeout=30)
        return "".join(self.lines)


def _start(command, env=None) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _tree(roots) -> list[psutil.Process]:
    procs = []
    for pid in roots:
        root = psutil.Process(pid)
        procs += [root] + root.children(recursive=True)
    return procs


def _wait_for_first_checkpoint(save_dir, procs, output, timeout=600) -> None:
    latest = os.path.join(save_dir, run_ckpt.LATEST)
    deadline = time.time() + timeout
    while not os.path.exists(latest):
        assert all(p.poll() is None for p in procs), f"the job ended early:\n{''.join(output.lines)[-4000:]}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def _alive(pgids, pids) -> list[str]:
    left = []
    for proc in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.pid in pids or os.getpgid(proc.pid) in pgids:
                left.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:120]}")
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return left


def _assert_nothing_left(job) -> None:
    pids = {p.pid for p in job}
    pgids = set()
    for p in job:
        try:
            pgids.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    while _alive(pgids, pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(pgids, pids), f"processes of the job left: {_alive(pgids, pids)}"


def _assert_one_complete_checkpoint_at_the_end(run_dir, *, only_periodic_before: bool = True) -> int:
    save_dir = os.path.join(run_dir, "checkpoints")
    logged = [json.loads(line)["iteration"] for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    names = sorted(os.listdir(save_dir))
    assert not [n for n in names if n.endswith(".tmp")], names
    last = logged[-1]
    final = os.path.join(save_dir, run_ckpt.iteration_dir_name(last))
    assert run_ckpt.is_complete(final), f"no complete checkpoint at the last logged step {last}: {names}"
    assert run_ckpt.find_resume_checkpoint(save_dir) == final
    extra = [n for n in names if n.startswith("iter_") and n != os.path.basename(final)
             and int(n[len("iter_"):]) % SAVE_INTERVAL]
    assert not (only_periodic_before and extra), f"checkpoints other than the periodic ones and the final one: {names}"
    return last


def _signal_tree(job, sig) -> None:
    for proc in job:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _srun_env(rank: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2",
                SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS="1")


CLI = [sys.executable, "-m", "k15_megatron.cli"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("path", ["parent", "group", "torchrun", "srun"])
def test_signal_saves_once_and_every_rank_exits_0(tmp_path, path):
    data, run_dir = _write_data(tmp_path / "sft.jsonl"), tmp_path / "run"
    args = _sft_args(run_dir, data, iters=100_000)
    if path in ("parent", "group"):
        procs = [_start(CLI + args)]
    elif path == "torchrun":
        procs = [_start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "-m", "k15_megatron.cli", *args])]
    else:
        port = free_port()
        procs = [_start(CLI + args, env=_srun_env(rank, port)) for rank in range(2)]
    output, job = _Output(procs), []
    try:
        _wait_for_first_checkpoint(str(run_dir / "checkpoints"), procs, output)
        job = _tree([p.pid for p in procs])
        ranks = psutil.Process(procs[0].pid).children() if path == "torchrun" else None
        assert len(job) > 3, "the writer's helper processes should be running (the case that broke the save)"
        if path == "parent":
            procs[0].send_signal(signal.SIGTERM)
        elif path == "group":
            os.killpg(procs[0].pid, signal.SIGTERM)
        elif path == "torchrun":
            procs[0].send_signal(signal.SIGTERM)
        else:
            _signal_tree(job, signal.SIGUSR1)
            time.sleep(0.5)
            _signal_tree(job, signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:  # nothing of a failed test keeps running
        _signal_tree(job, signal.SIGKILL)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = output.text()
    assert text.count("signal received, saved step") == 1 and "BrokenPipeError" not in text, text[-4000:]
    if path == "torchrun":
        # torchrun re-raises the signal (its one traceback) after its workers ended by themselves
        # within its grace period, before it would have SIGKILLed them.
        assert codes == [1] and "forcefully exiting" not in text and len(ranks) == 2, text[-4000:]
        assert text.count("Traceback") == 1 and "SignalException" in text, text[-4000:]
    else:
        assert codes == [0] * len(procs) and "Traceback" not in text, text[-4000:]
    _assert_nothing_left(job)
    last = _assert_one_complete_checkpoint_at_the_end(str(run_dir))

    if path != "parent":
        return
    # A second start resumes from that checkpoint, ignoring and then removing a killed save's leftovers.
    leftover = run_dir / "checkpoints" / run_ckpt.iteration_dir_name(last + 50)
    (run_dir / "checkpoints" / (leftover.name + ".tmp")).mkdir()
    (run_dir / "checkpoints" / "latest.tmp").write_text("iter_9999999\n")
    proc = subprocess.run(CLI + _sft_args(run_dir, data, iters=last + 2), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / run_ckpt.iteration_dir_name(last)} at step {last}" in proc.stdout
    assert _assert_one_complete_checkpoint_at_the_end(str(run_dir), only_periodic_before=False) == last + 2
