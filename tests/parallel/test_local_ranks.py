"""The parent that starts a command's ranks (k15_megatron/parallel/launch.py), with real processes.

A small command (written below) runs ``run_as_ranks(2, work)`` exactly as `k15 sft` and the
conversion tools do; its ``work`` fails, or waits for a stop signal like a training job does.
Checked: one message per error (the ranks named only when they differ), exit status 2 for a
known cause and 1 with one traceback for a bug, no launcher dump; a rank that fails stops the
others; every stop signal the parent receives reaches the ranks; a parent killed outright, or a
torchrun ended by a signal it does not handle, leaves no rank behind (the ranks get SIGTERM).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from tooling import REPO_ROOT

COMMAND = r'''
import os, sys, time
from k15_megatron.parallel.launch import run_as_ranks

MODE = sys.argv[1]


def work():
    rank = int(os.environ["RANK"])
    if MODE == "error":
        raise ValueError("data.train_path: train.jsonl line 3: the record has no 'prompt'")
    if MODE == "rank1_error":
        if rank == 1:
            raise FileNotFoundError("model.init_from: /nowhere does not exist")
        time.sleep(600)  # like a rank waiting for rank 1 in a collective
    if MODE == "bug":
        {}["no such key"]
    if MODE == "stop":
        from k15_megatron.jobs.preemption import PreemptionFlag

        flag = PreemptionFlag()
        print(f"rank {rank} records", flush=True)
        while flag.received is None:
            time.sleep(0.02)
        print(f"rank {rank} stopped by {flag.received}", flush=True)


if __name__ == "__main__":
    sys.exit(run_as_ranks(2, work))
'''


@pytest.fixture
def command(tmp_path):
    path = tmp_path / "two_ranks.py"
    path.write_text(COMMAND)
    return str(path)


def _run(command, mode):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID")}
    return subprocess.run([sys.executable, command, mode], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def _errors(text):
    """The lines that report errors (library warnings of the ranks' start-up aside)."""
    return [line for line in text.splitlines() if line.startswith("error")]


def _no_launcher_dump(text):
    assert "ChildFailedError" not in text and "torch.distributed.elastic" not in text, text


@pytest.mark.distributed
def test_a_known_error_on_every_rank_is_one_line_with_status_2(command):
    proc = _run(command, "error")
    assert proc.returncode == 2, proc.stderr
    assert _errors(proc.stderr) == ["error: data.train_path: train.jsonl line 3: the record has no 'prompt'"]
    _no_launcher_dump(proc.stdout + proc.stderr)


@pytest.mark.distributed
def test_an_error_on_one_rank_names_it_and_stops_the_others(command):
    begin = time.monotonic()
    proc = _run(command, "rank1_error")
    assert time.monotonic() - begin < 60, "the rank waiting for the failed one should have been stopped"
    assert proc.returncode == 2, proc.stderr
    assert _errors(proc.stderr) == ["error (rank 1): model.init_from: /nowhere does not exist"]
    _no_launcher_dump(proc.stdout + proc.stderr)


@pytest.mark.distributed
def test_a_bug_shows_its_traceback_once_with_status_1(command):
    proc = _run(command, "bug")
    assert proc.returncode == 1, proc.stderr
    assert _errors(proc.stderr) == ["error: unexpected exception"], proc.stderr
    assert proc.stderr.split("error: unexpected exception\n")[1].startswith("Traceback"), proc.stderr
    assert proc.stderr.count("Traceback") == 1 and "KeyError: 'no such key'" in proc.stderr, proc.stderr
    _no_launcher_dump(proc.stdout + proc.stderr)


@pytest.fixture
def started():
    """Processes a test starts; whatever of them and their descendants still runs is killed after it."""
    procs: list[psutil.Process] = []
    yield procs
    for proc in procs:
        try:
            tree = [proc] + proc.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def _start_stop_job(command, started, launcher=()):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID")}
    proc = subprocess.Popen([sys.executable, *launcher, command, "stop"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    started.append(psutil.Process(proc.pid))
    lines = []
    while "".join(lines).count("records") < 2:  # two ranks' prints may share a line
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    started.extend(ranks)
    assert len(ranks) == 2, "the launcher should start the ranks itself"
    return proc, ranks, lines


@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_every_stop_signal_reaches_the_ranks(command, started, sig):
    proc, ranks, lines = _start_stop_job(command, started)
    os.killpg(proc.pid, sig)  # the ranks are in groups of their own: only the parent gets it
    out, _ = proc.communicate(timeout=60)
    text = "".join(lines) + out
    assert proc.returncode == 0, text
    assert text.count(f"stopped by {int(sig)}") == 2, text
    assert f"k15: {sig.name} received" in text
    assert not [r for r in ranks if r.is_running() and r.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.distributed
def test_a_killed_parent_leaves_no_rank_behind(command, started):
    proc, ranks, lines = _start_stop_job(command, started)
    proc.kill()
    out, _ = proc.communicate(timeout=60)  # the output ends when the ranks, its last writers, exit
    text = "".join(lines) + out
    assert text.count(f"stopped by {int(signal.SIGTERM)}") == 2, text
    _, alive = psutil.wait_procs(ranks, timeout=30)  # not our children: no exit status to read
    assert not alive, text


@pytest.mark.distributed
def test_workers_of_a_torchrun_killed_by_a_signal_it_does_not_handle_stop(command, started):
    """SIGUSR1 is not among torchrun's default signals to handle: it ends torchrun at once."""
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc, ranks, lines = _start_stop_job(command, started, launcher)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    text = "".join(lines) + out
    assert proc.returncode == -signal.SIGUSR1, text
    assert text.count(f"stopped by {int(signal.SIGTERM)}") == 2, text
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, text


@pytest.mark.distributed
def test_a_stop_signal_during_a_rank_s_exit_does_not_kill_it(command, started):
    """Slurm follows its SIGUSR1 with SIGTERM to every process: one that lands while a rank that
    has already stopped shuts its interpreter down (when Python resets its handlers to the
    default) must not turn the rank's exit status 0 into -15."""
    proc, ranks, lines = _start_stop_job(command, started)
    os.kill(proc.pid, signal.SIGUSR1)
    while proc.poll() is None:  # SIGTERM to every rank, again and again, until they have exited
        for rank in ranks:
            try:
                os.kill(rank.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.002)
    text = "".join(lines) + proc.stdout.read()
    assert proc.returncode == 0, text
    assert text.count(f"stopped by {int(signal.SIGUSR1)}") + text.count(f"stopped by {int(signal.SIGTERM)}") == 2
