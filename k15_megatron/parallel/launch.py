"""Starting the ranks of a command, stopping them on a signal, and reporting their errors once.

A command such as ``k15 sft ... parallel.world_size=2`` or ``tools/convert_hf_to_megatron.py --tp 2``
needs several processes. :func:`run_as_ranks` is the body of every such command:

* under a launcher (torchrun's RANK, an srun step's SLURM_PROCID + SLURM_STEP_ID) this process is
  one of the ranks: it runs ``work()`` and returns its status;
* started by hand with ``nprocs > 1``, this process becomes the *parent*: it starts ``nprocs``
  copies of its own command line with the variables torchrun would give (RANK, LOCAL_RANK,
  WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), each in a process
  group of its own, waits for all of them and returns 0 only if every rank did.

Stopping (preemption). SIGTERM, SIGINT and SIGUSR1 are *stop signals*. A job that can stop
cleanly (``k15 sft``, ``k15 rl``) makes its ranks only record them (:func:`record_stop_signals`,
through :class:`k15_megatron.jobs.preemption.PreemptionFlag`, created before the first
iteration) and polls the record at its iteration boundaries (one all-reduce, so that every rank
agrees): all ranks finish the step, save one checkpoint and exit 0. Signals after the first
change nothing (send SIGKILL to abandon the save; the next start ignores and then removes the
unfinished ``iter_N.tmp``). Commands that do not record them (eval, export, the conversion
tools), and jobs still starting up, end at once. What each way of signalling a job does:

* the parent alone (``kill PID``): it forwards the signal to every rank whose job records stop
  signals and SIGTERM to the others, keeps waiting, and exits 0 when all ranks have saved and
  exited 0 (128 + the signal number when ranks were ended before they could save).
* the parent's process group (``kill -TERM -- -PGID``, Ctrl-C): the ranks are in process groups
  of their own, so only the parent receives it; as above.
* the parent killed outright (SIGKILL): on Linux every rank started by the parent (or by
  torchrun) has asked the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so the
  ranks save and exit; no orphans.
* torchrun started by the user (``torchrun ... -m k15_megatron.cli sft ...``): torchrun sends the
  signal it got (SIGTERM, SIGINT, SIGHUP, SIGQUIT, or what ``--signals-to-handle`` names) to each
  worker's process group, waits ``--shutdown-timeout`` seconds (default 30), then SIGKILLs. The
  ranks save and exit 0 if the save fits in that time; torchrun itself then exits non-zero
  (torch re-raises the signal; not k15's choice). A signal torchrun does not handle (SIGUSR1 by
  default) ends torchrun; its workers then get SIGTERM from the kernel, as above, and save.
* an srun step, or Slurm's ``--signal=USR1@T``, time limit or preemption, which signal every
  process of the step (helpers included), SIGTERM followed by SIGKILL after ``KillWait``: each
  rank records the signal and all of them save once and exit 0.

Helper processes that the checkpoint writer starts (Megatron's writer workers and its
multiprocessing Manager, the resource tracker) get the same signals from a process group or from
Slurm; they are started with the stop signals blocked (:func:`k15_megatron.checkpoint.dist_ckpt.
stop_signals_blocked`) so that they survive them and the save completes.

Errors. A rank that fails with a known cause (``ValueError``/``FileNotFoundError`` from
``work()``) or an unexpected exception writes its message or traceback into the parent's rank
directory instead of printing it; when all ranks have ended the parent prints each distinct
message once (``error: ...``, naming the ranks only when they differ) and returns 2 for known
causes, 1 otherwise. When one rank fails, the parent gives the others a few seconds to end by
themselves (they may be failing with the same message) and then kills their process groups.
Under an external launcher each failing rank prints ``error (rank R): ...`` itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
RANK_DIR_ENV = "K15_RANK_DIR"
"""Set by the parent for the ranks it starts: where ranks write ``ready_R`` and their errors."""
PARENT_PID_ENV = "K15_PARENT_PID"
FAILURE_GRACE_S = 5.0
"""After one rank failed, how long the others may take to end by themselves before being killed."""

_received: list[int] = []
_recording = False


def under_launcher() -> bool:
    """True inside torchrun (RANK set) or an srun step (SLURM_STEP_ID set)."""
    return "RANK" in os.environ or ("SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ)


def _record(signum, frame) -> None:
    _received.append(signum)


def record_stop_signals() -> dict:
    """From now on the stop signals are only recorded in this process, and a parent that started
    it forwards them as they are (idempotent). Returns the handlers it replaced (empty when
    already recording)."""
    global _recording
    if _recording:
        return {}
    _recording = True
    previous = {sig: signal.signal(sig, _record) for sig in STOP_SIGNALS}
    rank_dir = os.environ.get(RANK_DIR_ENV)
    if rank_dir and os.path.isdir(rank_dir):
        open(os.path.join(rank_dir, f"ready_{_rank()}"), "w").close()
    return previous


def stop_signal_received() -> int | None:
    """The first stop signal this process received, or None."""
    return _received[0] if _received else None


def stop_recording(previous: dict) -> None:
    """Put back the handlers :func:`record_stop_signals` replaced."""
    global _recording
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if previous:
        _recording = False


def _rank() -> str:
    return os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"


def run_as_ranks(nprocs: int, work, *, check=None) -> int:
    """The body of a command that needs ``nprocs`` ranks (see module doc); returns the exit status.

    ``check()`` validates the input before any process starts; its ``ValueError`` /
    ``FileNotFoundError`` is printed once (``error: ...``, by rank 0 only when already under a
    launcher) and gives exit status 2 without starting ranks. The same errors raised by ``work()``
    give status 2 and one message; an unexpected exception gives status 1 and its traceback once."""
    try:
        if check is not None:
            check()
        if nprocs < 1:
            raise ValueError(f"the tool needs at least one process, got {nprocs}")
    except (ValueError, FileNotFoundError) as exc:
        if os.environ.get("RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0":
            _write_line(f"error: {exc}")
        return 2
    if not under_launcher() and nprocs > 1:
        return run_local_ranks(nprocs)
    return _run_rank(work)


def _run_rank(work) -> int:
    from k15_megatron.parallel.initialize import shutdown

    rank_dir, rank = os.environ.get(RANK_DIR_ENV), _rank()
    if rank_dir or "TORCHELASTIC_RUN_ID" in os.environ:  # started by k15's parent or by torchrun
        _die_with_parent()
    try:
        work()
    except (ValueError, FileNotFoundError) as exc:
        if rank_dir:
            _write_file(os.path.join(rank_dir, f"error_{rank}.txt"), str(exc))
        else:
            several = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_STEP_NUM_TASKS") or 1) > 1
            _write_line(f"error (rank {rank}): {exc}" if several else f"error: {exc}")
        return 2
    except Exception:
        if not rank_dir:
            raise
        _write_file(os.path.join(rank_dir, f"bug_{rank}.txt"), traceback.format_exc())
        return 1
    finally:
        shutdown()
        _ignore_late_stop_signals()
    return 0


def _ignore_late_stop_signals() -> None:
    """A rank that recorded stop signals ignores them from here to its exit: Python resets its
    handlers to the default while the interpreter shuts down, so the SIGTERM Slurm sends shortly
    after the SIGUSR1 that stopped the job would otherwise kill a rank that has already saved,
    and its exit status would be -15 instead of 0."""
    if _recording:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def _write_line(text: str) -> None:
    """One write per line: lines of ranks sharing a pipe never interleave."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (text + "\n").encode())


def _write_file(path: str, text: str) -> None:
    with open(path + ".part", "w") as f:
        f.write(text)
    os.replace(path + ".part", path)


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies, so a killed parent leaves no training orphans."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(os.environ.get(PARENT_PID_ENV, os.getppid())):
        os.kill(os.getpid(), signal.SIGTERM)  # the parent was gone before the request took effect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _LocalRanks:
    """The ranks a parent started: forwarding stop signals, waiting, stopping after a failure."""

    def __init__(self, nprocs: int, rank_dir: str):
        self.nprocs, self.rank_dir = nprocs, rank_dir
        self.procs: list[subprocess.Popen] = []
        self.received: list[int] = []
        self.forwarded = [0] * nprocs  # how many of `received` each rank has been sent

    def on_signal(self, signum, frame) -> None:
        self.received.append(signum)  # forwarded to the ranks by the wait loop

    def start(self) -> None:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   WORLD_SIZE=str(self.nprocs), LOCAL_WORLD_SIZE=str(self.nprocs),
                   **{RANK_DIR_ENV: self.rank_dir, PARENT_PID_ENV: str(os.getpid())})
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: one core's threads per rank
        command = [sys.executable, *sys.orig_argv[1:]]  # the same interpreter options and -m
        for rank in range(self.nprocs):
            self.procs.append(subprocess.Popen(command, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                               process_group=0))

    def _forward(self) -> None:
        """Send each rank the signals received since its last forward: as they are to a rank
        whose job records them, as SIGTERM to one that does not (yet), which ends it at once
        (a SIGINT would end a Python rank with a KeyboardInterrupt traceback)."""
        for rank, proc in enumerate(self.procs):
            if self.forwarded[rank] == len(self.received) or proc.poll() is not None:
                continue
            recording = os.path.exists(os.path.join(self.rank_dir, f"ready_{rank}"))
            pending = self.received[self.forwarded[rank]:]  # a copy: the handler may append meanwhile
            for sig in pending:
                os.kill(proc.pid, sig if recording else signal.SIGTERM)
            self.forwarded[rank] += len(pending)

    def wait(self) -> list[int]:
        """Wait for every rank; returns their exit statuses (negative: ended by that signal)."""
        announced, failed_at = False, None
        while True:
            if self.received and not announced:
                announced = True
                _write_line(f"k15: {signal.Signals(self.received[0]).name} received; ranks that are training "
                            "finish their step, save a checkpoint and exit; ranks still starting stop at once")
            self._forward()
            codes = [proc.poll() for proc in self.procs]
            if None not in codes:
                return codes
            if failed_at is None and any(code not in (None, 0) for code in codes):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                self.kill()
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the process group (the rank and any helper it started) of every rank still running."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            proc.wait()


def run_local_ranks(nprocs: int) -> int:
    """Start ``nprocs`` ranks of this command line and wait for them (the parent; see module doc)."""
    with tempfile.TemporaryDirectory(prefix="k15-ranks-") as rank_dir:
        ranks = _LocalRanks(nprocs, rank_dir)
        previous = {sig: signal.signal(sig, ranks.on_signal) for sig in STOP_SIGNALS}
        try:
            ranks.start()
            codes = ranks.wait()
        finally:
            ranks.kill()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return _report(codes, rank_dir, stopped_by=ranks.received[0] if ranks.received else None)


def _ranks_text(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _report(codes: list[int], rank_dir: str, *, stopped_by: int | None) -> int:
    """Print each distinct rank error once; the parent's exit status."""
    if all(code == 0 for code in codes):
        return 0
    messages: dict[tuple[str, str], list[int]] = {}
    for rank in range(len(codes)):
        for kind in ("error", "bug"):
            path = os.path.join(rank_dir, f"{kind}_{rank}.txt")
            if os.path.exists(path):
                with open(path) as f:
                    messages.setdefault((kind, f.read()), []).append(rank)
    if not messages:
        if stopped_by is not None and all(code in (0, -signal.SIGTERM) for code in codes):
            _write_line(f"k15: the ranks were stopped by {signal.Signals(stopped_by).name} before they could save "
                        "(still starting, or a command that does not save on a signal)")
            return 128 + stopped_by
        ended = [f"rank {rank} " + (f"by {signal.Signals(-code).name}" if code < 0 else f"with status {code}")
                 for rank, code in enumerate(codes) if code != 0]
        _write_line("error: " + "; ".join(ended) + " (no error was reported)")
        return 1
    everyone = len(messages) == 1 and len(next(iter(messages.values()))) == len(codes)
    for (kind, text), ranks in messages.items():
        who = "" if everyone else f" ({_ranks_text(ranks)})"
        _write_line(f"error{who}: {text}" if kind == "error" else f"error{who}: unexpected exception\n{text.rstrip()}")
    return 2 if all(kind == "error" for kind, _ in messages) else 1
