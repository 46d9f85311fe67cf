"""Which protections the code sandbox can apply on this machine, probed once per process:
`protections` (and `SandboxError` when a required one is missing).

The probe forks a child that does what a run does — unshares the namespaces, assembles and
enters an allow-listed root (`fsview`), installs the system-call filter (`seccomp_filter`)
and checks that it turns ``unshare(CLONE_NEWUSER)`` into EPERM — and reports each step's
error. The cgroup backend is detected by `limits.cgroup_group`. Each missing protection is
either waived by its opt-out key or raised, naming that key.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

from k15_megatron.config.rewards import CodeRewardConfig
from k15_megatron.rewards import fsview
from k15_megatron.rewards import isolation as iso
from k15_megatron.rewards.limits import cgroup_group
from k15_megatron.rewards.seccomp_filter import Filter, get_filter

NAMESPACES = (iso.CLONE_NEWNS | iso.CLONE_NEWNET | iso.CLONE_NEWPID | iso.CLONE_NEWIPC
              | iso.CLONE_NEWUTS)
"""The namespaces every run gets (mount, network, pid, ipc, uts)."""


class SandboxError(RuntimeError):
    """The sandbox could not run the program (setup failed); not a verdict on the program."""


@dataclass(frozen=True)
class Protections:
    """Which protections sandboxed programs get in this process (see
    `k15_megatron.rewards.sandbox`)."""

    namespaces: bool
    filesystem_allowlist: bool
    seccomp: bool
    cgroup: bool
    limits_note: str = ""
    """How the process and memory limits hold (the cgroup, or why rlimits only)."""

    def metrics(self) -> dict[str, float]:
        """``rewards/code/isolation/<protection>``: 1.0 active, 0.0 not."""
        return {f"rewards/code/isolation/{name}": float(getattr(self, name))
                for name in ("namespaces", "filesystem_allowlist", "seccomp", "cgroup")}


_PROBE: dict[str, str] = {}
_PROTECTIONS: dict[tuple, tuple[Protections, Optional[str]]] = {}


def protections(cfg: CodeRewardConfig) -> Protections:
    """The protections `execute` applies under ``cfg``, probed once per process.

    Raises SandboxError naming the opt-out key when one that ``cfg`` requires is unavailable:
    namespaces with the file-system allow-list (``rewards.code.allow_no_namespaces``), the
    system-call filter (``rewards.code.allow_no_seccomp``), the cgroup
    (``rewards.code.limits_backend=cgroup``)."""
    key = _protections_key(cfg)
    if key not in _PROTECTIONS:
        if not _PROBE:
            _PROBE.update(_probe())
        full = not (_PROBE["namespaces"] or _PROBE["filesystem"])
        if not full and not cfg.allow_no_namespaces:
            raise SandboxError(
                f"code sandbox cannot isolate programs here "
                f"({_PROBE['namespaces'] or _PROBE['filesystem']}); it needs root, Linux "
                "network/mount/pid namespaces and pivot_root into an allow-listed root. Set "
                "rewards.code.allow_no_namespaces=true to run untrusted code WITHOUT network, "
                "file-system and uid isolation.")
        if _PROBE["seccomp"] and not cfg.allow_no_seccomp:
            raise SandboxError(
                f"code sandbox cannot filter system calls here ({_PROBE['seccomp']}). Install "
                "libseccomp (libseccomp2) and the pyseccomp package, or set "
                "rewards.code.allow_no_seccomp=true to run untrusted code WITHOUT the filter.")
        group, why = None, "no namespaces"
        if full:
            try:
                group, why = cgroup_group(cfg)
            except ValueError as err:
                raise SandboxError(str(err)) from None
        elif cfg.limits_backend == "cgroup":
            raise SandboxError("rewards.code.limits_backend=cgroup needs full isolation "
                               "(root and namespaces); set rewards.code.limits_backend=auto")
        note = (f"cgroup v2 group per run under {group}" if group
                else f"rlimits and a poll of the tree's resident memory ({why})")
        _PROTECTIONS[key] = (Protections(full, full, not _PROBE["seccomp"], group is not None,
                                         note), group)
    return _PROTECTIONS[key][0]


def _protections_key(cfg: CodeRewardConfig) -> tuple:
    return (cfg.allow_no_namespaces, cfg.allow_no_seccomp, cfg.limits_backend, cfg.cgroup_parent)


def cgroup_parent(cfg: CodeRewardConfig) -> Optional[str]:
    """The cgroup v2 group runs under ``cfg`` are created in (None: rlimit backend)."""
    protections(cfg)
    return _PROTECTIONS[_protections_key(cfg)][1]


def isolation_mode(cfg: CodeRewardConfig) -> str:
    """``"full"`` (namespaces, uid switch, allow-listed root) or ``"none"`` (only when
    ``cfg.allow_no_namespaces``); raises SandboxError as `protections` does."""
    return "full" if protections(cfg).namespaces else "none"


def _probe() -> dict[str, str]:
    """Try each protection in a forked child: ``{protection: ""}`` when it works, else the
    reason. The filter is tried after the namespaces, as in a real run."""
    if os.geteuid() != 0:
        denied = "not running as root, so programs cannot run as a separate unprivileged uid"
        result = {"namespaces": denied, "filesystem": denied}
    else:
        result = {"namespaces": "probe died", "filesystem": "probe died"}
    seccomp, why = get_filter()
    result["seccomp"] = why or "probe died"
    root = tempfile.mkdtemp(prefix="k15-sandbox-probe-")
    view = fsview.resolve(fsview.SYSTEM_PATHS)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            _probe_child(write_fd, root, view, seccomp, os.geteuid() == 0)
        finally:
            os._exit(0)
    os.close(write_fd)
    for record in _read_all(read_fd).split(b"\0"):
        name, _, message = record.decode(errors="replace").partition("=")
        if name in result:
            result[name] = message
    os.waitpid(pid, 0)
    os.rmdir(root)
    return result


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _probe_child(fd: int, root: str, view: fsview.View, seccomp: Optional[Filter],
                 root_user: bool) -> None:
    def report(name: str, message: str) -> None:
        os.write(fd, f"{name}={message[:500]}\0".encode())

    if root_user:
        try:
            iso.unshare(NAMESPACES)
            iso.mount(None, "/", None, iso.MS_REC | iso.MS_PRIVATE)
            report("namespaces", "")
            try:
                fsview.build_root(root, view, uid=65534, workdir_mb=1, workdir_files=16,
                                  tmp_mb=1)
                fsview.enter_root(root)
                report("filesystem", "")
            except OSError as err:
                report("filesystem", f"allow-listed root: {err}")
        except OSError as err:
            report("namespaces", str(err))
    if seccomp is not None:
        try:
            iso.prctl(iso.PR_SET_NO_NEW_PRIVS, 1)
            seccomp.install()
            try:
                iso.unshare(iso.CLONE_NEWUSER)
                report("seccomp", "the filter let unshare(CLONE_NEWUSER) through")
            except OSError as err:
                report("seccomp", "" if err.errno == errno.EPERM else
                       f"unshare(CLONE_NEWUSER) failed with {err} instead of EPERM")
        except OSError as err:
            report("seccomp", str(err))
