"""Run one untrusted command in isolation and report what happened: `execute`.

Process layout of one execution (all started with ``os.fork``, no shell)::

    caller (worker process) ── reads stdout/stderr with caps, enforces the wall-clock limit
      └─ supervisor: setsid, dies with the caller; unshares net/mount/pid/ipc/uts namespaces,
         │            builds the program's root from an allow-list (`fsview`) and enters it,
         │            waits, reports the status
         └─ program: pid 1 of the new pid namespace; mounts its /proc, joins its cgroup (if
                     any, `limits`), applies rlimits (CPU, AS, NPROC, FSIZE, NOFILE, CORE),
                     drops to the leased uid, installs the system-call filter
                     (`seccomp_filter`), execs.

Protections, each detected once per process and reported by `protections` (module
`protections`; metrics ``rewards/code/isolation/*``):

- namespaces: network (no interface but a downed loopback), pid (nothing outlives a run),
  ipc, uts and mount namespaces, and an unprivileged leased uid (`isolation`);
- filesystem_allowlist: the program's ``/`` holds only the allow-listed host paths (read-only),
  its working directory and a /tmp (`fsview`); no data set, checkpoint, source tree or other
  run is visible, whatever its file mode;
- seccomp: namespace creation, mount, ptrace, bpf, keyctl, perf_event_open, module and reboot
  calls, raw and packet sockets fail with EPERM (`seccomp_filter`);
- cgroup: a cgroup v2 group per run bounds the whole tree's processes and memory (`limits`);
  without it RLIMIT_NPROC (per leased uid), RLIMIT_AS (per process) and a poll of the tree's
  resident memory do.

A missing protection makes `execute` raise `SandboxError` naming its opt-out key
(``rewards.code.allow_no_namespaces``, ``allow_no_seccomp``, ``limits_backend=cgroup`` is
the only way the cgroup is required), so untrusted code never runs with less than asked for
without an explicit setting. With ``allow_no_namespaces`` the program runs with rlimits, the
filter, a scrubbed environment and a process group only (no network or file-system isolation:
it reads what its uid may read); a root trainer still runs it as a leased unprivileged uid
(never as root, and the per-uid process limit holds), a non-root trainer as its own user.

The working directory `fsview.WORKDIR` is a private tmpfs (size- and inode-limited) owned by
the leased uid; with /tmp it is the only writable place, and it vanishes with the run (files
to keep, like a compiled binary, are copied out by the supervisor). The environment is
replaced by a minimal one (PATH, HOME, TMPDIR, LANG and thread-count caps), so nothing of the
caller's environment (tokens, keys) reaches the program. stdout and stderr are each read up to
``max_output_bytes``; one byte more kills the run (``output_overflow``). On the wall-clock
deadline (or overflow) the program is SIGKILLed through a pidfd (the supervisor reports its
pid first); being pid 1 of its namespace it takes every descendant with it, and the
supervisor's ``waitpid`` returns only once the kernel has reaped them all, so when `execute`
returns nothing of the run is left — not even a zombie holding the uid's NPROC count. If the
caller dies, the supervisor and program die with it (parent-death signals).

What a program is refused shows up as its own failure (an OSError in the program: runtime
error or wrong answer), never as a sandbox failure. Failures of the sandbox itself (namespaces
refused, a missing interpreter) raise `SandboxError`: they are not the program's fault and
must not silently become rewards of 0.

Cost (tools/bench/sandbox_throughput.py, which compares with ``subprocess.run`` and, with
``--baseline-ref``, with an earlier revision's sandbox in the same run): a Python program is
dominated by interpreter start-up (~25-35 ms on the 2-core development VM), and the sandbox
about breaks even with a bare subprocess there — the isolation's few ms are paid back by the
interpreter not finding this project's packages (its editable-install hooks fail fast).
"""

from __future__ import annotations

import errno
import os
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from k15_megatron.config.rewards import CodeRewardConfig
from k15_megatron.rewards import fsview
from k15_megatron.rewards import isolation as iso
from k15_megatron.rewards.limits import Limits, RunGroup, set_rlimits, tree_resident_bytes
from k15_megatron.rewards.pool import process_cpu_seconds
from k15_megatron.rewards.protections import (NAMESPACES, Protections, SandboxError,
                                              cgroup_parent, isolation_mode, protections)
from k15_megatron.rewards.seccomp_filter import Filter, get_filter

__all__ = ["ExecResult", "Limits", "Protections", "SandboxError", "execute", "isolation_mode",
           "protections", "read_regular_file", "sandbox_env"]

_DRAIN_AFTER_KILL_S = 5.0
_CPU_POLL_S = 0.02
_MAX_COLLECT_BYTES = 256 << 20
# execve errors that are the program's own doing (a binary too big for the memory limit, or
# not an executable); any other exec failure means the sandbox is misconfigured.
_PROGRAM_EXEC_ERRORS = (errno.ENOMEM, errno.E2BIG, errno.ENOEXEC)


@dataclass
class ExecResult:
    """What one execution did. ``exit_code`` is None when a signal (``signal``) ended it;
    ``exec_errno`` is set when ``execve`` itself failed for the program (ENOMEM from a huge
    static array under the memory limit, ENOEXEC...); ``oom_killed`` when the run was killed
    for the memory of its whole process tree (the cgroup's OOM kill, or the rlimit backend's
    resident-memory watch)."""

    exit_code: Optional[int]
    signal: Optional[int]
    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_overflow: bool
    wall_s: float
    exec_errno: Optional[int] = None
    files: dict[str, bytes] = field(default_factory=dict)
    oom_killed: bool = False


def sandbox_env(workdir: str) -> dict[str, str]:
    """The whole environment a sandboxed program sees."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _report(fd: int, tag: bytes, value: int, message: str = "") -> None:
    """One report record: tag, int32, uint16 length, message. Each record is far below
    PIPE_BUF, so records from the supervisor and the program never interleave."""
    data = message.encode(errors="replace")[:1000]
    os.write(fd, tag + struct.pack("iH", value, len(data)) + data)


def _parse_reports(data: bytes) -> list[tuple[bytes, int, bytes]]:
    records, header = [], struct.calcsize("iH")
    while len(data) >= 1 + header:
        value, length = struct.unpack("iH", data[1:1 + header])
        if len(data) < 1 + header + length:
            break
        records.append((data[:1], value, data[1 + header:1 + header + length]))
        data = data[1 + header + length:]
    return records


@dataclass
class _Job:
    """Everything the forked children need; built in the caller before ``fork``."""

    argv: Sequence[str]
    host_dir: str  # a fresh root-only host directory: the new root's mount point (full mode)
    files: Mapping[str, bytes]
    executables: Sequence[str]
    collect: Sequence[str]
    limits: Limits
    uid: Optional[int]
    view: Optional[fsview.View]  # None: no namespaces, the program works in host_dir itself
    seccomp: Optional[Filter]
    cgroup_fd: int  # the run group's cgroup.procs, or -1
    results_dir_fd: int  # the caller's (host) view of host_dir, for collected files

    @property
    def workdir(self) -> str:
        """The working directory as the program sees it."""
        return fsview.WORKDIR if self.view is not None else self.host_dir


def _program_child(job: _Job, stdin_fd: int, out_fd: int, err_fd: int, report_fd: int) -> None:
    """Runs in the forked program process; never returns."""
    stage = "setup"
    try:
        if job.view is not None:
            fsview.mount_proc()
        for src, dst in ((stdin_fd, 0), (out_fd, 1), (err_fd, 2)):
            os.dup2(src, dst)
        os.chdir(job.workdir)
        if job.cgroup_fd >= 0:
            os.write(job.cgroup_fd, b"0")  # before anything can fork: the whole tree counts
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, 1 << 16)
        set_rlimits(job.limits)
        if job.uid is not None:
            iso.drop_privileges(job.uid)
        else:
            iso.prctl(iso.PR_SET_NO_NEW_PRIVS, 1)
        iso.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)
        if job.seccomp is not None:
            job.seccomp.install()
        stage = "exec"
        os.execve(job.argv[0], list(job.argv), sandbox_env(job.workdir))
    except OSError as err:
        _report(report_fd, b"X" if stage == "exec" else b"E", err.errno or 0, str(err))
    except BaseException as err:
        _report(report_fd, b"E", 0, repr(err))
    finally:
        os._exit(127)


def _write_files(job: _Job) -> None:
    for name, content in job.files.items():
        path = os.path.join(job.workdir, name)
        with open(path, "wb") as handle:
            handle.write(content)
        os.chmod(path, 0o755 if name in job.executables else 0o644)
        if job.uid is not None:
            os.chown(path, job.uid, job.uid)


def read_regular_file(dir_fd: int, name: str, max_bytes: int) -> Optional[bytes]:
    """Content of ``name`` under ``dir_fd`` if it is a regular file of at most ``max_bytes``;
    None otherwise. Never follows a symlink or blocks on a FIFO a program may have planted."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(max_bytes + 1)[:max_bytes]
    finally:
        os.close(fd)


def _copy_out(job: _Job) -> None:
    """Copy collected files from the sandbox's tmpfs to the caller's view of the directory."""
    tmpfs_fd = os.open(job.workdir, os.O_RDONLY | os.O_DIRECTORY)
    for name in job.collect:
        data = read_regular_file(tmpfs_fd, name, _MAX_COLLECT_BYTES)
        if data is not None:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600,
                         dir_fd=job.results_dir_fd)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
    os.close(tmpfs_fd)


def _supervisor_child(job: _Job, stdin_fd: int, out_fd: int, err_fd: int, report_fd: int,
                      parent: int) -> None:
    """Runs in the forked supervisor process; never returns."""
    try:
        os.setsid()
        iso.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the caller died before the death signal was armed
            os._exit(1)
        if job.view is not None:
            assert job.uid is not None
            iso.unshare(NAMESPACES)
            iso.mount(None, "/", None, iso.MS_REC | iso.MS_PRIVATE)  # nothing reaches the host
            fsview.build_root(job.host_dir, job.view, uid=job.uid,
                              workdir_mb=job.limits.max_workdir_mb,
                              workdir_files=job.limits.max_workdir_files,
                              tmp_mb=job.limits.max_tmp_mb)
            fsview.enter_root(job.host_dir)  # from here on only descriptors reach the host
            _write_files(job)
        pid = os.fork()
        if pid == 0:
            _program_child(job, stdin_fd, out_fd, err_fd, report_fd)
        _report(report_fd, b"P", pid)
        for fd in (stdin_fd, out_fd, err_fd):
            os.close(fd)
        # Reaping the program also waits until the kernel has torn down its pid namespace
        # (every process left in it killed and reaped), so "supervisor exited" means "all gone".
        _, status = os.waitpid(pid, 0)
        if job.view is not None and job.collect:
            _copy_out(job)
        _report(report_fd, b"S", status)
    except BaseException as err:
        _report(report_fd, b"E", 0, f"supervisor: {err}")
    finally:
        os._exit(0)


_VIEWS: dict[tuple, fsview.View] = {}


def _view(executable: str, language: Optional[str], cfg: CodeRewardConfig) -> fsview.View:
    """The allow-listed root for ``executable`` (cached; resolved in the caller before fork)."""
    python = (language == "python" if language is not None
              else os.path.basename(executable).startswith("python"))
    key = (executable, python, tuple(cfg.sandbox_readonly_paths))
    if key not in _VIEWS:
        try:
            _VIEWS[key] = fsview.view_for(executable, python=python,
                                          extra=cfg.sandbox_readonly_paths)
        except (ValueError, OSError, subprocess.SubprocessError) as err:
            raise SandboxError(f"rewards.code.sandbox_readonly_paths / {executable!r}: "
                               f"{err}") from None
    return _VIEWS[key]


def execute(argv: Sequence[str], *, files: Mapping[str, bytes], stdin: bytes = b"",
            limits: Limits, config: CodeRewardConfig, executables: Sequence[str] = (),
            collect: Sequence[str] = (), language: Optional[str] = None) -> ExecResult:
    """Run ``argv`` (``argv[0]`` an absolute path, or relative to the working directory) in a
    fresh sandbox whose working directory holds ``files`` (name -> content; names in
    ``executables`` get mode 0755) and whose stdin is ``stdin``.

    ``collect``: names of regular files to read back from the working directory afterwards
    (missing or non-regular ones are left out). ``language`` chooses the file-system
    allow-list (`fsview`): ``"python"`` adds the interpreter's prefixes, anything else only
    the system paths; None: ``"python"`` when ``argv[0]``'s name starts with "python". Raises
    SandboxError when the sandbox itself fails or a required protection is unavailable.
    """
    guard = protections(config)
    full = guard.namespaces
    view = _view(argv[0], language, config) if full else None
    seccomp = get_filter()[0] if guard.seccomp else None
    # Without namespaces a root trainer (a container without CAP_SYS_ADMIN) still runs the
    # program as a leased uid: never as root, and RLIMIT_NPROC, which root ignores, holds.
    drop_uid = full or os.geteuid() == 0
    try:
        lease = iso.UidLease(config.sandbox_uid_base, config.num_sandbox_uids) if drop_uid else None
    except RuntimeError as err:
        raise SandboxError(str(err)) from None
    group: Optional[RunGroup] = None
    host_dir = tempfile.mkdtemp(prefix="k15-sandbox-")  # root-only 0700: the host's view
    dir_fd = os.open(host_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if guard.cgroup:
            try:
                group = RunGroup(cgroup_parent(config), limits)
            except OSError as err:
                raise SandboxError(f"cannot create the run's cgroup: {err}") from None
        job = _Job(list(argv), host_dir, files, list(executables), list(collect), limits,
                   lease.uid if lease else None, view, seccomp,
                   group.join_fd if group else -1, dir_fd)
        if not full:
            if lease is not None:
                os.chown(host_dir, lease.uid, lease.uid)
            _write_files(job)  # no namespace: the program works in the host directory itself
        result = _run(job, stdin)
        if group is not None:
            result.oom_killed = group.oom_killed()
        for name in collect:
            data = read_regular_file(dir_fd, name, _MAX_COLLECT_BYTES)
            if data is not None:
                result.files[name] = data
        return result
    finally:
        os.close(dir_fd)
        shutil.rmtree(host_dir, ignore_errors=True)
        if group is not None:
            group.close()
        if lease is not None:
            if not full:  # no pid namespace took the tree down: whatever left the group goes now
                iso.kill_processes_of(lease.uid)
            lease.release()


def _run(job: _Job, stdin: bytes) -> ExecResult:
    with tempfile.TemporaryFile() as stdin_file:
        stdin_file.write(stdin)
        stdin_file.flush()
        stdin_file.seek(0)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        rep_r, rep_w = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            for fd in (out_r, err_r, rep_r):
                os.close(fd)
            _supervisor_child(job, stdin_file.fileno(), out_w, err_w, rep_w, os.getppid())
        for fd in (out_w, err_w, rep_w):
            os.close(fd)
        streams, timed_out, overflow, over_memory = _pump(
            pid, out_r, err_r, rep_r, start, job.limits, full=job.view is not None,
            watch_memory=job.view is not None and job.cgroup_fd < 0)
        os.waitpid(pid, 0)
        wall = time.monotonic() - start
    reports = {tag: (value, message) for tag, value, message in _parse_reports(streams[rep_r])}
    if b"E" in reports:
        raise SandboxError("sandbox set-up failed: " + reports[b"E"][1].decode(errors="replace"))
    result = ExecResult(None, None, streams[out_r], streams[err_r], timed_out, overflow, wall,
                        oom_killed=over_memory)
    if b"X" in reports:
        result.exec_errno, message = reports[b"X"]
        if result.exec_errno not in _PROGRAM_EXEC_ERRORS:  # a missing or unreachable interpreter
            raise SandboxError(f"cannot execute {job.argv[0]!r} in the sandbox: "
                               f"{message.decode(errors='replace')} (is it, and everything it "
                               f"loads, under the allow-list? add folders with "
                               f"rewards.code.sandbox_readonly_paths)")
        result.stderr += b"\nexecve failed: " + message
    elif b"S" in reports:
        status = reports[b"S"][0]
        if os.WIFSIGNALED(status):
            result.signal = os.WTERMSIG(status)
        else:
            result.exit_code = os.WEXITSTATUS(status)
    elif not (timed_out or overflow or over_memory):
        raise SandboxError("sandbox supervisor ended without a report")
    else:
        result.signal = signal.SIGKILL
    return result


class _Killer:
    """Kills one execution: the program through a pidfd (race-free against pid reuse) as soon
    as the supervisor has reported its pid, else (or as a backstop) the supervisor's group."""

    def __init__(self, supervisor: int, full: bool):
        self.supervisor, self.full = supervisor, full
        self.pidfd = self.program = -1

    def learn(self, report: bytes) -> None:
        if self.pidfd < 0:
            for tag, value, _ in _parse_reports(report):
                if tag == b"P":
                    self.program = value
                    try:
                        self.pidfd = os.pidfd_open(value)
                    except ProcessLookupError:
                        pass  # already gone: nothing to kill
                    break

    def kill_program(self) -> None:
        # Without a pid namespace the program's children would survive it: kill the group.
        if self.full and self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                return
            except ProcessLookupError:
                return
        self.kill_supervisor()

    def kill_supervisor(self) -> None:
        for target in (lambda: os.killpg(self.supervisor, signal.SIGKILL),
                       lambda: os.kill(self.supervisor, signal.SIGKILL)):
            try:
                target()
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _pump(pid: int, out_r: int, err_r: int, rep_r: int, start: float, limits: Limits, *,
          full: bool, watch_memory: bool) -> tuple[dict[int, bytes], bool, bool, bool]:
    """Read the three pipes to EOF under the output cap, the CPU-time limit (the program's own
    CPU plus that of the children it reaped, polled every ``_CPU_POLL_S``), with
    ``watch_memory`` the tree's resident memory (polled likewise) and the wall-clock backstop.
    Past any, the program is killed and the supervisor (which then reaps everything and
    reports) gets ``_DRAIN_AFTER_KILL_S`` to finish before its whole group is killed too.
    Returns the streams and whether time, output or memory ran over."""
    buffers: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray(), rep_r: bytearray()}
    selector = selectors.DefaultSelector()
    for fd in buffers:
        selector.register(fd, selectors.EVENT_READ)
    killer = _Killer(pid, full)
    deadline = start + limits.wall_s
    killed_at: Optional[float] = None
    timed_out = overflow = over_memory = False
    memory_bytes = limits.memory_mb << 20
    try:
        while selector.get_map():
            now = time.monotonic()
            if killed_at is None and (now >= deadline or (
                    killer.program > 0 and process_cpu_seconds(
                        killer.program, include_children=True) > limits.time_limit_s)):
                timed_out, killed_at = True, now
                killer.kill_program()
            elif (killed_at is None and watch_memory and killer.program > 0
                  and tree_resident_bytes(killer.program) > memory_bytes):
                over_memory, killed_at = True, now
                killer.kill_program()
            if killed_at is not None and now - killed_at > _DRAIN_AFTER_KILL_S:
                killer.kill_supervisor()  # something still holds a pipe (no-namespace mode)
                break
            wait = (min(deadline, now + _CPU_POLL_S) if killed_at is None
                    else killed_at + _DRAIN_AFTER_KILL_S) - now
            for key, _ in selector.select(timeout=max(wait, 0.0)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buf = buffers[key.fd]
                if key.fd == rep_r:
                    buf += chunk
                    killer.learn(bytes(buf))
                    continue
                buf += chunk[:max(limits.max_output_bytes + 1 - len(buf), 0)]
                if len(buf) > limits.max_output_bytes and killed_at is None:
                    overflow, killed_at = True, time.monotonic()
                    killer.kill_program()
    finally:
        selector.close()
        killer.close()
        for fd in buffers:
            os.close(fd)
    cap = limits.max_output_bytes
    return ({fd: bytes(buf[:cap]) if fd != rep_r else bytes(buf) for fd, buf in buffers.items()},
            timed_out, overflow, over_memory)
