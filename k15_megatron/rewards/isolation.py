"""Linux isolation primitives for the code sandbox: namespaces, a read-only view, uid leases.

What was verified on the development machines (root in a VM, kernel 6.18, no cgroup delegation
needed) and why each piece exists:

- Python 3.11 has no ``os.unshare``, so ``unshare(2)``, ``mount(2)``, ``mount_setattr(2)`` and
  ``prctl(2)`` are called through ctypes.
- RLIMIT_NPROC is not enforced for root (uid 0 is exempt in the kernel), so a fork bomb running
  as root is bounded by nothing. Sandboxed programs therefore run as an unprivileged uid; each
  concurrent sandbox *leases its own* uid (``flock`` on a lock file per uid) because the
  NPROC count is per user: with a shared uid one fork bomb would make every other sandbox's
  ``execve`` fail. Uids need no /etc/passwd entry.
- An unprivileged uid alone cannot write the repository (root-owned, 0755) but can write
  world-writable places (/tmp, /dev/shm, /var/tmp). So the sandbox gets a private mount
  namespace in which every mount is read-only (``mount_setattr(AT_RECURSIVE,
  MOUNT_ATTR_RDONLY)``) except its own working directory, a size-limited tmpfs (so the
  total a program writes is bounded, not only each file by RLIMIT_FSIZE). Device nodes such as
  /dev/null stay writable on a read-only mount.
- A new network namespace has only a downed loopback interface: ``connect`` fails with
  "Network is unreachable".
- A new pid namespace makes the program pid 1 of its namespace: when it exits or is killed,
  the kernel kills and reaps every process it left behind, including ones that escaped the
  process group with ``setsid`` — nothing can outlive a run. A new IPC namespace keeps SysV
  shared memory private.
- Interpreters installed under a directory the sandbox uid cannot traverse (pyenv in /root,
  mode 0700) are made reachable by mounting a tmpfs over that directory *inside the namespace*
  and bind-mounting only the needed child into it; the rest of it stays hidden.

Everything here runs in forked children between ``fork`` and ``execve``; nothing is imported
there (the import lock may be held by another thread of the parent at fork time).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import time
from dataclasses import dataclass
from typing import Optional, Sequence

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # x86-64 and arm64 share this number (added in Linux 5.12)
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


def set_readonly(path: str, *, recursive: bool, readonly: bool = True) -> None:
    """Make the mount at ``path`` (and every mount below it if ``recursive``) read-only, or
    read-write with ``readonly=False``, via ``mount_setattr(2)``."""
    attr = (_MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0) if readonly
            else _MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0))
    flags = AT_RECURSIVE if recursive else 0
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr),
                         ctypes.sizeof(attr)), f"mount_setattr({path!r})")


def prctl(option: int, value: int) -> None:
    """``prctl(2)`` with one argument."""
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


@dataclass(frozen=True)
class Exposure:
    """Inside the namespace, mount a tmpfs over ``hidden`` (a directory the sandbox uid cannot
    traverse) and bind-mount ``hidden/<child>`` for each of ``children`` back into it."""

    hidden: str
    children: tuple[str, ...]


def exposures_for(paths: Sequence[str]) -> list[Exposure]:
    """Exposures that make every path in ``paths`` reachable by an unprivileged uid.

    For each path, the first ancestor without world execute permission is hidden and the next
    path component under it is exposed. Assumes the exposed subtree itself is world-readable
    (true for interpreter installs); deeper hidden levels are not handled.
    """
    found: dict[str, set[str]] = {}
    for path in paths:
        parts = os.path.realpath(path).strip("/").split("/")
        current = "/"
        for i, part in enumerate(parts[:-1]):
            current = os.path.join(current, part)
            try:
                mode = os.stat(current).st_mode
            except OSError:
                break
            if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
                child = parts[i + 1]
                found.setdefault(current, set()).add(child)
                break
    return [Exposure(h, tuple(sorted(c))) for h, c in sorted(found.items())]


def setup_mount_namespace(workdir: str, exposures: Sequence[Exposure], *, uid: int,
                          size_mb: int, max_files: int) -> None:
    """In a fresh mount namespace: stop propagation to the host, apply ``exposures``, make
    everything read-only, then mount a private tmpfs over ``workdir`` owned by ``uid`` and
    bounded to ``size_mb`` MiB and ``max_files`` inodes (nosuid, nodev). RLIMIT_FSIZE bounds
    one file only; the tmpfs bounds the total, so no program can fill the host's disk."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    for exp in exposures:
        fds = [os.open(os.path.join(exp.hidden, c), os.O_PATH) for c in exp.children]
        mount("tmpfs", exp.hidden, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
        for child, fd in zip(exp.children, fds):
            target = os.path.join(exp.hidden, child)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
            os.close(fd)
    set_readonly("/", recursive=True)
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={size_mb}m,nr_inodes={max_files},mode=700,uid={uid},gid={uid}")


def drop_privileges(uid: int) -> None:
    """Become ``uid``:``uid`` with no supplementary groups and no way back (no_new_privs).
    The uid change clears a parent-death signal: callers set theirs after this."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


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
