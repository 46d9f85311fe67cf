"""Run one untrusted command in isolation and report what happened: `execute`.

Process layout of one execution (all started with ``os.fork``, no shell)::

    caller (worker process) ── reads stdout/stderr with caps, enforces the wall-clock limit
      └─ supervisor: setsid, dies with the caller; unshares net/mount/pid/ipc namespaces,
         │            builds the read-only view (see `isolation`), waits, reports the status
         └─ program: pid 1 of the new pid namespace; mounts its /proc, applies rlimits
                     (CPU, AS, NPROC, FSIZE, NOFILE, CORE), drops to the leased uid, execs.

The working directory is a private tmpfs (size- and inode-limited) mounted over a fresh
temporary directory, owned by the leased uid; it is the only writable place, and it vanishes
with the run (files to keep, like a compiled binary, are copied out by the supervisor). The environment is replaced by a minimal one (PATH, HOME, TMPDIR, LANG and
thread-count caps), so nothing of the caller's environment (tokens, keys) reaches the program.
stdout and stderr are each read up to ``max_output_bytes``; one byte more kills the run
(``output_overflow``). On the wall-clock deadline (or overflow) the program is SIGKILLed
through a pidfd (the supervisor reports its pid first); being pid 1 of its namespace it takes
every descendant with it, and the supervisor's ``waitpid`` returns only once the kernel has
reaped them all, so when `execute` returns nothing of the run is left — not even a zombie
holding the uid's NPROC count. If the caller dies, the supervisor and program die with it
(parent-death signals).

Measured on the 2-core development VM (quiet moments): about 5 ms of isolation overhead per
execution over a bare fork/exec (``/bin/true``: ~5.7 ms vs ~0.5 ms); a Python program is
dominated by interpreter start-up (~20-25 ms). tools/bench/sandbox_throughput.py compares
with ``subprocess.run``.

Failures of the sandbox itself (namespaces refused, a missing interpreter) raise
`SandboxError`: they are not the program's fault and must not silently become rewards of 0.
Without root or namespaces the sandbox refuses to run unless
``CodeRewardConfig.allow_no_namespaces`` is set, in which case it runs with rlimits, a
scrubbed environment and a process group only (no network, filesystem or uid isolation).
"""

from __future__ import annotations

import errno
import math
import os
import resource
import selectors
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from k15_megatron.config.rewards import CodeRewardConfig, wall_time_limit
from k15_megatron.rewards import isolation as iso
from k15_megatron.rewards.pool import process_cpu_seconds

_NAMESPACES = iso.CLONE_NEWNS | iso.CLONE_NEWNET | iso.CLONE_NEWPID | iso.CLONE_NEWIPC
_DRAIN_AFTER_KILL_S = 5.0
_CPU_POLL_S = 0.02
_MAX_COLLECT_BYTES = 256 << 20
# execve errors that are the program's own doing (a binary too big for the memory limit, or
# not an executable); any other exec failure means the sandbox is misconfigured.
_PROGRAM_EXEC_ERRORS = (errno.ENOMEM, errno.E2BIG, errno.ENOEXEC)


class SandboxError(RuntimeError):
    """The sandbox could not run the program (setup failed); not a verdict on the program."""


@dataclass
class Limits:
    """Resource limits of one execution (units in the names)."""

    time_limit_s: float
    """CPU seconds of the program (polled; RLIMIT_CPU = ceil(this) + 1 per process as well)."""
    memory_mb: int
    max_output_bytes: int
    max_processes: int
    max_file_mb: int
    max_open_files: int
    max_workdir_mb: int = 64
    max_workdir_files: int = 4096
    wall_time_limit_s: float = 0.0
    """Wall-clock backstop; 0: `wall_time_limit` of ``time_limit_s``."""

    @property
    def wall_s(self) -> float:
        """The wall-clock limit in effect."""
        return wall_time_limit(self.time_limit_s, self.wall_time_limit_s)

    @classmethod
    def from_config(cls, cfg: CodeRewardConfig, **overrides: float) -> "Limits":
        """Limits of ``cfg`` with keyword ``overrides`` (e.g. ``time_limit_s=2``)."""
        values = dict(time_limit_s=cfg.time_limit_s, memory_mb=cfg.memory_mb,
                      max_output_bytes=cfg.max_output_bytes, max_processes=cfg.max_processes,
                      max_file_mb=cfg.max_file_mb, max_open_files=cfg.max_open_files,
                      max_workdir_mb=cfg.max_workdir_mb, max_workdir_files=cfg.max_workdir_files,
                      wall_time_limit_s=cfg.wall_time_limit_s)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class ExecResult:
    """What one execution did. ``exit_code`` is None when a signal (``signal``) ended it;
    ``exec_errno`` is set when ``execve`` itself failed for the program (ENOMEM from a huge
    static array under the memory limit, ENOEXEC...)."""

    exit_code: Optional[int]
    signal: Optional[int]
    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_overflow: bool
    wall_s: float
    exec_errno: Optional[int] = None
    files: dict[str, bytes] = field(default_factory=dict)


_MODE_CACHE: dict[bool, str] = {}


def isolation_mode(cfg: CodeRewardConfig) -> str:
    """``"full"`` (namespaces + uid switch) or ``"none"`` (only when the config allows it).

    Probed once per process by forking a child that tries the namespace set-up. Raises
    SandboxError with the reason when full isolation is impossible and not explicitly waived.
    """
    allow = cfg.allow_no_namespaces
    if allow not in _MODE_CACHE:
        reason = _probe_full_isolation()
        if reason and not allow:
            raise SandboxError(
                f"code sandbox cannot isolate programs here ({reason}); it needs root and "
                "Linux network/mount/pid namespaces. Set rewards.code.allow_no_namespaces=true "
                "to run untrusted code WITHOUT network and filesystem isolation.")
        _MODE_CACHE[allow] = "none" if reason else "full"
    return _MODE_CACHE[allow]


def _probe_full_isolation() -> str:
    if os.geteuid() != 0:
        return "not running as root, so programs cannot run as a separate unprivileged uid"
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            iso.unshare(_NAMESPACES)
            iso.mount(None, "/", None, iso.MS_REC | iso.MS_PRIVATE)
            iso.set_readonly("/", recursive=True)
            os.write(write_fd, b"ok")
        except BaseException as err:
            os.write(write_fd, str(err).encode()[:500])
        finally:
            os._exit(0)
    os.close(write_fd)
    message = _read_all(read_fd)
    os.waitpid(pid, 0)
    return "" if message == b"ok" else message.decode(errors="replace") or "probe died"


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


_EXPOSURES: dict[str, list] = {}


def _exposures(executable: str) -> list:
    """Exposures making the interpreter (or compiler) and this Python reachable; cached, and
    computed in the caller before forking so the child only mounts."""
    if not os.path.isabs(executable):
        executable = ""  # a program file inside the working directory
    if executable not in _EXPOSURES:
        paths = [executable, sys.executable, sys.prefix, sys.base_prefix, tempfile.gettempdir()]
        _EXPOSURES[executable] = iso.exposures_for([p for p in paths if p])
    return _EXPOSURES[executable]


def sandbox_env(workdir: str) -> dict[str, str]:
    """The whole environment a sandboxed program sees."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _set_rlimits(limits: Limits) -> None:
    cpu = math.ceil(limits.time_limit_s) + 1
    memory = limits.memory_mb << 20
    for which, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_AS, (memory, memory)),
                         (resource.RLIMIT_NPROC, (limits.max_processes,) * 2),
                         (resource.RLIMIT_FSIZE, ((limits.max_file_mb << 20),) * 2),
                         (resource.RLIMIT_NOFILE, (limits.max_open_files,) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(which, value)


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
    workdir: str
    files: Mapping[str, bytes]
    executables: Sequence[str]
    collect: Sequence[str]
    limits: Limits
    uid: Optional[int]
    full: bool
    results_dir_fd: int  # the caller's (host) view of workdir, for collected files


def _program_child(job: _Job, stdin_fd: int, out_fd: int, err_fd: int, report_fd: int) -> None:
    """Runs in the forked program process; never returns."""
    stage = "setup"
    try:
        if job.full:
            iso.mount("proc", "/proc", "proc", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC)
        for src, dst in ((stdin_fd, 0), (out_fd, 1), (err_fd, 2)):
            os.dup2(src, dst)
        os.chdir(job.workdir)
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, 1 << 16)
        _set_rlimits(job.limits)
        if job.uid is not None:
            iso.drop_privileges(job.uid)
        iso.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)
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
        if job.full:
            iso.unshare(_NAMESPACES)
            assert job.uid is not None
            iso.setup_mount_namespace(job.workdir, _exposures(job.argv[0]), uid=job.uid,
                                      size_mb=job.limits.max_workdir_mb,
                                      max_files=job.limits.max_workdir_files)
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
        if job.full and job.collect:
            _copy_out(job)
        _report(report_fd, b"S", status)
    except BaseException as err:
        _report(report_fd, b"E", 0, f"supervisor: {err}")
    finally:
        os._exit(0)


def execute(argv: Sequence[str], *, files: Mapping[str, bytes], stdin: bytes = b"",
            limits: Limits, config: CodeRewardConfig, executables: Sequence[str] = (),
            collect: Sequence[str] = ()) -> ExecResult:
    """Run ``argv`` (``argv[0]`` an absolute path, or relative to the working directory) in a
    fresh sandbox whose working directory holds ``files`` (name -> content; names in
    ``executables`` get mode 0755) and whose stdin is ``stdin``.

    ``collect``: names of regular files to read back from the working directory afterwards
    (missing or non-regular ones are left out). Raises SandboxError when the sandbox itself
    fails.
    """
    full = isolation_mode(config) == "full"
    if full:
        _exposures(argv[0])  # fill the cache before fork: the children only read it
    try:
        lease = iso.UidLease(config.sandbox_uid_base, config.num_sandbox_uids) if full else None
    except RuntimeError as err:
        raise SandboxError(str(err)) from None
    workdir = tempfile.mkdtemp(prefix="k15-sandbox-")  # root-only 0700: the host's view
    dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        job = _Job(list(argv), workdir, files, list(executables), list(collect), limits,
                   lease.uid if lease else None, full, dir_fd)
        if not full:
            _write_files(job)  # no namespace: the program works in the host directory itself
        result = _run(job, stdin)
        for name in collect:
            data = read_regular_file(dir_fd, name, _MAX_COLLECT_BYTES)
            if data is not None:
                result.files[name] = data
        return result
    finally:
        os.close(dir_fd)
        shutil.rmtree(workdir, ignore_errors=True)
        if lease is not None:
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
        streams, timed_out, overflow = _pump(pid, out_r, err_r, rep_r, start, job.limits,
                                             job.full)
        os.waitpid(pid, 0)
        wall = time.monotonic() - start
    reports = {tag: (value, message) for tag, value, message in _parse_reports(streams[rep_r])}
    if b"E" in reports:
        raise SandboxError("sandbox set-up failed: " + reports[b"E"][1].decode(errors="replace"))
    result = ExecResult(None, None, streams[out_r], streams[err_r], timed_out, overflow, wall)
    if b"X" in reports:
        result.exec_errno, message = reports[b"X"]
        if result.exec_errno not in _PROGRAM_EXEC_ERRORS:  # a missing or unreachable interpreter
            raise SandboxError(f"cannot execute {job.argv[0]!r} in the sandbox: "
                               f"{message.decode(errors='replace')}")
        result.stderr += b"\nexecve failed: " + message
    elif b"S" in reports:
        status = reports[b"S"][0]
        if os.WIFSIGNALED(status):
            result.signal = os.WTERMSIG(status)
        else:
            result.exit_code = os.WEXITSTATUS(status)
    elif not (timed_out or overflow):
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


def _pump(pid: int, out_r: int, err_r: int, rep_r: int, start: float, limits: Limits,
          full: bool) -> tuple[dict[int, bytes], bool, bool]:
    """Read the three pipes to EOF under the output cap, the CPU-time limit (the program's own
    CPU plus that of the children it reaped, polled every ``_CPU_POLL_S``) and the wall-clock
    backstop. Past any, the program is killed and the supervisor (which then reaps everything
    and reports) gets ``_DRAIN_AFTER_KILL_S`` to finish before its whole group is killed too."""
    buffers: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray(), rep_r: bytearray()}
    selector = selectors.DefaultSelector()
    for fd in buffers:
        selector.register(fd, selectors.EVENT_READ)
    killer = _Killer(pid, full)
    deadline = start + limits.wall_s
    killed_at: Optional[float] = None
    timed_out = overflow = False
    try:
        while selector.get_map():
            now = time.monotonic()
            if killed_at is None and (now >= deadline or (
                    killer.program > 0 and process_cpu_seconds(
                        killer.program, include_children=True) > limits.time_limit_s)):
                timed_out, killed_at = True, now
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
            timed_out, overflow)
