"""The system-call filter of sandboxed programs: kernel interfaces no test program needs fail
with "Operation not permitted" (EPERM).

Denied (`DENIED`): creating or entering namespaces (``unshare``, ``setns``, ``clone`` with any
``CLONE_NEW*`` flag), mounting and changing root (``mount``, the new mount API, ``pivot_root``,
``chroot``), ``ptrace`` and cross-process memory access, ``bpf``, the key ring (``keyctl``,
``add_key``, ``request_key``), ``perf_event_open``, ``userfaultfd``, ``io_uring``, file
handles (``open_by_handle_at``), kernel modules, ``kexec``, ``reboot``, swap, accounting,
clock and host-name changes, port I/O, and sockets of family ``AF_PACKET`` or of type
``SOCK_RAW`` in ``AF_INET``/``AF_INET6`` (netlink's ``SOCK_RAW`` sockets, which the C
library's ``if_nameindex`` uses, stay allowed). Everything else is allowed: a deny-list keeps every benign program working
(threads, numpy, pipes, stdin) while the mount and pid namespaces, the read-only root and the
unprivileged uid stay the main walls; the filter shrinks the kernel surface behind them.
``clone3`` fails with ENOSYS instead (its flags sit in memory a filter cannot read), so the C
library falls back to ``clone``, whose flags the filter checks. A system call of another
architecture's ABI (32-bit ``int 0x80`` on x86-64) kills the calling thread (libseccomp's
bad-architecture action).

The rules are compiled to BPF once per process by libseccomp (through the ``pyseccomp`` ctypes
binding) in the caller; the forked program only hands the ready program to the kernel with
``seccomp(SECCOMP_SET_MODE_FILTER)`` right before ``execve``, after the privilege drop set
``no_new_privs``. ``SECCOMP_FILTER_FLAG_SPEC_ALLOW`` is passed so that installing a filter does
not also switch on the speculative-store-bypass mitigation for the program (kernels before
5.16 did so by default, which slows compute-bound programs); Docker passes it for the same
reason.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
from typing import Optional

DENIED = (
    "unshare", "setns",
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev",
    "bpf", "keyctl", "add_key", "request_key", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "fanotify_init", "lookup_dcookie", "syslog",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "settimeofday", "clock_settime", "clock_adjtime", "sethostname", "setdomainname",
    "iopl", "ioperm", "vhangup",
)
"""System calls that fail with EPERM in the sandbox (those the architecture has)."""

CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000)
"""CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET: ``clone`` with any fails."""

AF_INET, AF_INET6, AF_PACKET, SOCK_RAW, SOCK_TYPE_MASK = 2, 10, 17, 3, 0xF
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1, 1 << 2
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine, -1)
_BPF_INSTRUCTION_BYTES = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Filter:
    """A compiled filter, ready to install in a forked child (`install`)."""

    def __init__(self, bpf: bytes):
        assert len(bpf) % _BPF_INSTRUCTION_BYTES == 0, "libseccomp exported a partial program"
        self._code = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // _BPF_INSTRUCTION_BYTES,
                                ctypes.cast(self._code, ctypes.c_void_p))

    def install(self) -> None:
        """Apply the filter to the calling thread and every process it will start. Needs
        ``no_new_privs`` (or CAP_SYS_ADMIN); raises OSError naming the call."""
        for flags in (_SECCOMP_FILTER_FLAG_SPEC_ALLOW, 0):  # SPEC_ALLOW: Linux >= 4.17
            if _libc.syscall(_SYS_SECCOMP, _SECCOMP_SET_MODE_FILTER, flags,
                             ctypes.byref(self._prog)) == 0:
                return
            err = ctypes.get_errno()
            if err != errno.EINVAL:
                break
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")


def compile_filter() -> Filter:
    """Compile the rules with libseccomp. Raises OSError/RuntimeError/ImportError when
    libseccomp or its binding is missing or rejects the rules."""
    import pyseccomp as sc

    rules = sc.SyscallFilter(sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:  # negative: not on this architecture
            rules.add_rule(deny, name)
    for flag in CLONE_NEW_FLAGS:
        rules.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    rules.add_rule(deny, "socket", sc.Arg(0, sc.EQ, AF_PACKET))
    for family in (AF_INET, AF_INET6):  # netlink's SOCK_RAW (if_nameindex) stays allowed
        rules.add_rule(deny, "socket", sc.Arg(0, sc.EQ, family),
                       sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, SOCK_RAW))
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        return Filter(out.read())


_CACHE: list[tuple[Optional[Filter], str]] = []


def get_filter() -> tuple[Optional[Filter], str]:
    """The process's compiled filter and ``""``, or None and why it cannot be built (no
    libseccomp, no ``pyseccomp``, an unsupported architecture); computed once."""
    if not _CACHE:
        if _SYS_SECCOMP < 0:
            _CACHE.append((None, f"no seccomp system call number for {os.uname().machine}"))
        else:
            try:
                _CACHE.append((compile_filter(), ""))
            except (ImportError, OSError, RuntimeError, ValueError) as err:
                _CACHE.append((None, f"libseccomp filter unavailable ({type(err).__name__}: "
                                     f"{err})"))
    return _CACHE[0]
