"""Resource limits of one sandboxed execution: per-process rlimits and, where the machine
allows it, a cgroup v2 group that bounds the whole process tree.

Two backends (``rewards.code.limits_backend``):

- rlimit: RLIMIT_NPROC bounds the processes and threads of the leased uid, so of the whole tree
  (every sandbox has its own uid); RLIMIT_AS bounds each process's address space; and the
  caller polls the tree's resident memory (`tree_resident_bytes`, every ~20 ms with the CPU
  time) and kills the run past ``memory_mb`` (``ExecResult.oom_killed``: verdict
  memory_limit). Polled, so a tree can overshoot for one interval.
- cgroup: each run gets its own cgroup v2 group with ``pids.max = max_processes``,
  ``memory.max = memory_mb`` (``memory.swap.max = 0``); the program joins it before ``execve``,
  so every descendant is counted together, and an out-of-memory kill in the group is reported
  (``ExecResult.oom_killed``), giving the verdict memory_limit. The rlimits stay on top.

``auto`` picks cgroup when `detect_cgroup` finds a usable hierarchy: a cgroup v2 mount, the
parent group (``rewards.code.cgroup_parent``, else this process's own group) offering the
``memory`` and ``pids`` controllers, and a sub-group of it where both can be enabled for
children (the cgroup v2 rule "no processes in inner groups" forbids it in a group that holds
processes, such as a container's own group without delegation). On machines where memory and
pids are bound to cgroup v1 (hybrid layouts) it falls back to rlimits. The choice is logged
once by the code reward (`k15_megatron.rewards.code.isolation_metrics`) and reported in the
metrics (``rewards/code/isolation/cgroup``).
"""

from __future__ import annotations

import atexit
import errno
import logging
import math
import os
import resource
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from k15_megatron.config.rewards import CodeRewardConfig, wall_time_limit

logger = logging.getLogger(__name__)


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
    max_tmp_mb: int = 16

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
                      wall_time_limit_s=cfg.wall_time_limit_s, max_tmp_mb=cfg.max_tmp_mb)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def set_rlimits(limits: Limits) -> None:
    """Apply the per-process limits to the calling process (the forked program, as root,
    before it drops privileges)."""
    cpu = math.ceil(limits.time_limit_s) + 1
    memory = limits.memory_mb << 20
    for which, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_AS, (memory, memory)),
                         (resource.RLIMIT_NPROC, (limits.max_processes,) * 2),
                         (resource.RLIMIT_FSIZE, ((limits.max_file_mb << 20),) * 2),
                         (resource.RLIMIT_NOFILE, (limits.max_open_files,) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(which, value)


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


_OWN_CMDLINE: Optional[bytes] = None


def tree_resident_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` and all its descendants, in bytes: the sum of each
    process's RSS (so pages shared after ``fork`` count once per process), read from /proc
    (``statm`` and ``task/*/children``); 0 once the process is gone. The rlimit backend's
    watch on the whole tree's memory (`k15_megatron.rewards.sandbox` polls it); about 0.1 ms
    for a single-process program.

    A process still running this process's command line (forked from it, not yet past
    ``execve``: the sandbox's program before it starts) counts 0: it maps the caller's whole
    resident set, gigabytes in a trainer, which the program never owns."""
    global _OWN_CMDLINE
    if _OWN_CMDLINE is None:
        with open("/proc/self/cmdline", "rb") as handle:
            _OWN_CMDLINE = handle.read()
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/cmdline", "rb") as handle:
                before_exec = handle.read() == _OWN_CMDLINE
            with open(f"/proc/{current}/statm", "rb") as handle:
                total += 0 if before_exec else int(handle.read().split()[1]) * _PAGE_BYTES
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", "rb") as handle:
                    todo += [int(child) for child in handle.read().split()]
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    return total


_CONTROLLERS = ("memory", "pids")


def _cgroup2_mount() -> Optional[str]:
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            before, _, after = line.partition(" - ")
            if after.split(" ", 1)[0] == "cgroup2":
                return before.split()[4]
    return None


def _own_cgroup(mount: str) -> str:
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            if line.startswith("0::"):
                return os.path.join(mount, line[3:].strip().lstrip("/"))
    raise OSError("this process has no cgroup v2 entry in /proc/self/cgroup")


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def detect_cgroup(cfg: CodeRewardConfig) -> tuple[Optional[str], str]:
    """``(group, "")`` where ``group`` is a new cgroup v2 directory of this process in which
    per-run groups get the memory and pids controllers, or ``(None, why not)``."""
    try:
        if os.geteuid() != 0:
            return None, "not root"
        mount = _cgroup2_mount()
        if mount is None:
            return None, "no cgroup2 file system mounted"
        parent = cfg.cgroup_parent or _own_cgroup(mount)
        available = _read(os.path.join(parent, "cgroup.controllers")).split()
        missing = [c for c in _CONTROLLERS if c not in available]
        if missing:
            return None, (f"cgroup v2 group {parent} does not offer the {'/'.join(missing)} "
                          f"controller(s) (offered: {' '.join(available) or 'none'}); set "
                          f"rewards.code.cgroup_parent to a delegated group")
        enabled = _read(os.path.join(parent, "cgroup.subtree_control")).split()
        if any(c not in enabled for c in _CONTROLLERS):
            _write(os.path.join(parent, "cgroup.subtree_control"),
                   " ".join(f"+{c}" for c in _CONTROLLERS))
        _remove_stale_groups(parent)
        group = os.path.join(parent, f"k15-sandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.mkdir(group)
        try:
            _write(os.path.join(group, "cgroup.subtree_control"),
                   " ".join(f"+{c}" for c in _CONTROLLERS))
        except OSError:
            os.rmdir(group)
            raise
        atexit.register(_remove_quietly, group)
        return group, ""
    except OSError as err:
        return None, (f"cgroup v2 unusable ({err}); set rewards.code.cgroup_parent to a "
                      f"delegated group")


def _remove_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _remove_stale_groups(parent: str) -> None:
    """Remove the groups of processes that died without their exit handlers (a pool worker
    killed for a deadline), with their emptied run groups; best effort."""
    for name in os.listdir(parent):
        if not name.startswith("k15-sandbox-"):
            continue
        try:
            os.kill(int(name.split("-")[2]), 0)
            continue  # its process is alive
        except ProcessLookupError:
            pass
        except (ValueError, IndexError, PermissionError):
            continue
        group = os.path.join(parent, name)
        for run in os.listdir(group):
            if run.startswith("run-"):
                _remove_quietly(os.path.join(group, run))
        _remove_quietly(group)


_BACKEND: dict[tuple[str, str], tuple[Optional[str], str]] = {}


def cgroup_group(cfg: CodeRewardConfig) -> tuple[Optional[str], str]:
    """This process's cgroup v2 group for sandbox runs under ``cfg`` (None with the reason when
    the rlimit backend is in use); detected once per process. Raises ValueError when
    ``limits_backend=cgroup`` and the machine does not allow it."""
    key = (cfg.limits_backend, cfg.cgroup_parent)
    if key not in _BACKEND:
        group, why = (None, "rewards.code.limits_backend=rlimit") \
            if cfg.limits_backend == "rlimit" else detect_cgroup(cfg)
        if group is None and cfg.limits_backend == "cgroup":
            raise ValueError(f"rewards.code.limits_backend=cgroup but {why}; set "
                             f"rewards.code.limits_backend=auto to fall back to rlimits")
        logger.debug("code sandbox limits: %s", f"cgroup v2 ({group})" if group else
                     f"rlimits ({why})")
        _BACKEND[key] = (group, why)
    return _BACKEND[key]


class RunGroup:
    """One run's cgroup under ``parent``: made with the run's limits, joined by the program
    (`join_fd`: an open ``cgroup.procs`` to write ``b"0"`` to), removed by `close`."""

    def __init__(self, parent: str, limits: Limits):
        self.path = os.path.join(parent, f"run-{uuid.uuid4().hex[:12]}")
        os.mkdir(self.path)
        try:
            _write(os.path.join(self.path, "pids.max"), str(limits.max_processes))
            _write(os.path.join(self.path, "memory.max"), str(limits.memory_mb << 20))
            try:
                _write(os.path.join(self.path, "memory.swap.max"), "0")
            except FileNotFoundError:
                pass  # no swap accounting: nothing to bound
            self.join_fd = os.open(os.path.join(self.path, "cgroup.procs"), os.O_WRONLY)
        except OSError:
            os.rmdir(self.path)
            raise

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this group for exceeding memory.max."""
        for line in _read(os.path.join(self.path, "memory.events")).splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill" and int(value) > 0:
                return True
        return False

    def close(self) -> None:
        """Remove the group (its processes are gone: the run's pid namespace has ended)."""
        if self.join_fd >= 0:
            os.close(self.join_fd)
            self.join_fd = -1
        for _ in range(100):  # the last exited processes may take a moment to leave the group
            try:
                os.rmdir(self.path)
                return
            except OSError as err:
                if err.errno != errno.EBUSY:
                    raise
                time.sleep(0.001)
        logger.warning("code sandbox: cgroup %s still busy; left behind", self.path)
