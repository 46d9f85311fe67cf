"""Linux isolation primitives for the code sandbox: namespaces, mounts, uid leases.

What was verified on the development machines (root in a VM, kernel 6.18, no cgroup delegation
needed) and why each piece exists:

- Python 3.11 has no ``os.unshare``, so ``unshare(2)``, ``mount(2)``, ``mount_setattr(2)`` and
  ``prctl(2)`` are called through ctypes.
- RLIMIT_NPROC is not enforced for root (uid 0 is exempt in the kernel), so a fork bomb running
  as root is bounded by nothing. Sandboxed programs therefore run as an unprivileged uid; each
  concurrent sandbox *leases its own* uid (``flock`` on a lock file per uid) because the
  NPROC count is per user: with a shared uid one fork bomb would make every other sandbox's
  ``execve`` fail. Uids need no /etc/passwd entry.
- An unprivileged uid alone cannot write the repository (root-owned, 0755) but can read every
  world-readable file and write world-writable places (/tmp, /dev/shm). So the sandbox gets a
  private mount namespace whose root holds only an allow-list of host paths, read-only
  (`k15_megatron.rewards.fsview`), plus its own size-limited tmpfs working directory and /tmp.
  Device nodes such as /dev/null stay writable on a read-only mount.
- A new network namespace has only a downed loopback interface: ``connect`` fails with
  "Network is unreachable".
- A new pid namespace makes the program pid 1 of its namespace: when it exits or is killed,
  the kernel kills and reaps every process it left behind, including ones that escaped the
  process group with ``setsid`` — nothing can outlive a run. A new IPC namespace keeps SysV
  shared memory private.

Everything here runs in forked children between ``fork`` and ``execve``; nothing is imported
there (the import lock may be held by another thread of the parent at fork time).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import time
from typing import Optional

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
MNT_DETACH = 2
SYS_MOUNT_SETATTR = 442  # x86-64 and arm64 share this number (added in Linux 5.12)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, -1)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
LEASE_DIR = "/tmp/k15-sandbox-uids"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """``unshare(2)``; raises OSError naming the call."""
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def mount(source: Optional[str], target: str, fstype: Optional[str], flags: int,
          data: Optional[str] = None) -> None:
    """``mount(2)``; raises OSError naming the target."""
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc.mount(enc(source), target.encode(), enc(fstype), flags, enc(data)),
           f"mount({source!r} -> {target!r})")


def set_mount_attrs(path: str, attrs: int, *, recursive: bool) -> None:
    """Set ``MOUNT_ATTR_*`` flags ``attrs`` on the mount at ``path`` (and every mount below it
    if ``recursive``) via ``mount_setattr(2)``."""
    attr = _MountAttr(attrs, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr),
                         ctypes.sizeof(attr)), f"mount_setattr({path!r})")


def pivot_root(new_root: str, put_old: str) -> None:
    """``pivot_root(2)`` (no libc wrapper); raises OSError naming the call."""
    _check(_libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()),
           f"pivot_root({new_root!r}, {put_old!r})")


def umount2(target: str, flags: int) -> None:
    """``umount2(2)``; raises OSError naming the target."""
    _check(_libc.umount2(target.encode(), flags), f"umount2({target!r})")


def prctl(option: int, value: int) -> None:
    """``prctl(2)`` with one argument."""
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def drop_privileges(uid: int) -> None:
    """Become ``uid``:``uid`` with no supplementary groups and no way back (no_new_privs).
    The uid change clears a parent-death signal: callers set theirs after this."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def processes_of(uid: int) -> list[tuple[int, str]]:
    """(pid, state letter from /proc/<pid>/status, e.g. "S", "Z") of every process whose real
    uid is ``uid``; processes that exit while /proc is read are left out."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            real, state = int(fields["Uid"].split()[0]), fields["State"].split()[0]
        except (OSError, KeyError, ValueError, IndexError):
            continue  # exited while we looked
        if real == uid:
            found.append((int(entry), state))
    return found


def kill_processes_of(uid: int, *, rounds: int = 20) -> None:
    """SIGKILL every live process whose real uid is ``uid`` (a leased sandbox uid, so only one
    run's processes have it), scanning ``/proc`` until none is left (a process may fork between two
    scans; the uid's RLIMIT_NPROC bounds how many). Raises RuntimeError if some survive
    ``rounds`` scans."""
    for _ in range(rounds):
        live = [pid for pid, state in processes_of(uid) if state not in ("Z", "X")]  # a zombie runs nothing
        if not live:
            return
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    raise RuntimeError(f"processes of sandbox uid {uid} survived {rounds} rounds of SIGKILL")


class UidLease:
    """Exclusive use of one uid in ``[base, base + count)`` across all processes on the host,
    held by an ``flock`` on ``/tmp/k15-sandbox-uids/<uid>.lock`` (released on `release` or
    when the holder dies). The path is fixed, not $TMPDIR, so every process on the host agrees
    on it. Waits up to ``wait_s`` for a free uid."""

    def __init__(self, base: int, count: int, *, wait_s: float = 60.0):
        lock_dir = LEASE_DIR
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        deadline = time.monotonic() + wait_s
        start = os.getpid() % count  # spread concurrent leasers over the range
        while True:
            for k in range(count):
                uid = base + (start + k) % count
                fd = os.open(os.path.join(lock_dir, f"{uid}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    os.close(fd)
                    if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    continue
                self.uid, self._fd = uid, fd
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no free sandbox uid in [{base}, {base + count}) after "
                                   f"{wait_s} s; raise rewards.code.num_sandbox_uids")
            time.sleep(0.01)

    def release(self) -> None:
        """Give the uid back (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "UidLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
