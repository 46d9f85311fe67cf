"""The file system a sandboxed program sees: an allow-list of host paths on a fresh root.

The program's ``/`` is a small tmpfs that holds only mount points: the allow-listed host paths
bind-mounted read-only (and nosuid) at their own absolute paths, its private writable working
directory `WORKDIR` (a size- and inode-limited tmpfs owned by the leased uid), a size-limited
``/tmp`` tmpfs, a fresh ``/proc`` of its pid namespace, and in ``/dev`` only ``null``, ``zero``,
``full``, ``random`` and ``urandom`` (plus the ``fd``/``stdin``/``stdout``/``stderr`` links).
Nothing else of the host exists there: no data sets, checkpoints, project source, home
directories or other runs' working directories, whatever their file modes.

The default allow-list (`SYSTEM_PATHS`, for every language) is what dynamically linked
programs and the compilers need: ``/usr``, ``/bin``, ``/sbin``, ``/lib``, ``/lib32``,
``/lib64``, ``/libx32`` and from ``/etc`` only the dynamic loader's cache and configuration,
``/etc/alternatives`` (the compiler symlinks) and ``/etc/localtime``. Python programs also get
their interpreter's installation and environment (``sys.base_prefix`` and ``sys.prefix`` of
the configured interpreter, e.g. a pyenv version and a virtualenv; never the project that
installed it). ``rewards.code.sandbox_readonly_paths`` adds more (e.g. a read-only package
folder). Paths that do not exist on the host are skipped; a symlink on the way to an
allowed path (``/lib -> usr/lib`` on merged-/usr systems) is recreated as the same symlink.

How the root is entered follows bubblewrap and nsjail: in the sandbox's private mount
namespace (propagation private, so nothing reaches the host) the new root is assembled on a
tmpfs, made read-only recursively with ``mount_setattr(2)``, the two writable tmpfs are mounted
on top, and ``pivot_root(".", ".")`` followed by a lazy unmount of the old root leaves the
host's tree unreachable, not merely hidden under a ``chroot``.

Like `isolation`, the functions that run in forked children (`build_root`, `enter_root`) import
nothing; `view_for` does all path resolution in the caller before ``fork``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

from k15_megatron.rewards import isolation as iso

WORKDIR = "/sandbox"
"""The program's working directory (and $HOME, $TMPDIR) inside the sandbox."""

SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
                "/etc/alternatives", "/etc/localtime")
"""Host paths every sandboxed program sees (read-only): the system's binaries and libraries."""

DEVICES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
              ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))
_RESERVED = (WORKDIR, "/tmp", "/proc", "/dev")
_ROOT_OPTIONS = "mode=755,size=1m,nr_inodes=4096"


@dataclass(frozen=True)
class View:
    """What one sandbox root holds. ``binds``: host paths (resolved, no symlink on the way),
    mounted read-only at the same path, parents before children; ``links``: (path, target)
    symlinks recreated as on the host."""

    binds: tuple[str, ...]
    links: tuple[tuple[str, str], ...]


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def resolve(paths: Sequence[str], *, required: Sequence[str] = ()) -> View:
    """The `View` exposing ``paths`` (absolute host paths; missing ones are skipped, except
    those also in ``required``, e.g. the user's own additions).

    Raises ValueError for a relative path, a missing required one, or one that would cover the
    sandbox's own mounts (`WORKDIR`, /tmp, /proc, /dev)."""
    extra_paths = {os.path.normpath(p) for p in required}
    binds: set[str] = set()
    links: dict[str, str] = {}
    todo, seen = list(paths), 0
    while todo:
        path = os.path.normpath(todo.pop())
        seen += 1
        if seen > 1000:
            raise ValueError(f"sandbox allow-list: too many symlinks resolving {paths!r}")
        if not os.path.isabs(path):
            raise ValueError(f"sandbox allow-list: {path!r} is not an absolute path")
        if any(_inside(path, r) or _inside(r, path) for r in _RESERVED) or path == "/":
            raise ValueError(f"sandbox allow-list: {path!r} would cover the sandbox's own "
                             f"{', '.join(_RESERVED)}")
        if not os.path.lexists(path):
            if path in extra_paths:  # a user's typo must not pass silently
                raise ValueError(f"sandbox allow-list: {path!r} does not exist")
            continue
        current = "/"
        for i, part in enumerate(path.strip("/").split("/")):
            current = os.path.join(current, part)
            if os.path.islink(current):
                links[current] = os.readlink(current)
                rest = path.strip("/").split("/")[i + 1:]
                todo.append(os.path.join(os.path.realpath(current), *rest))
                break
        else:
            binds.add(path)
    # a bind below another bind is already visible; a link inside a bind exists there too
    kept = sorted(b for b in binds if not any(b != o and _inside(b, o) for o in binds))
    kept_links = sorted((p, t) for p, t in links.items() if not any(_inside(p, b) for b in kept))
    return View(tuple(kept), tuple(kept_links))


_PREFIXES: dict[str, tuple[str, ...]] = {}


def python_prefixes(interpreter: str) -> tuple[str, ...]:
    """``sys.base_prefix`` and ``sys.prefix`` of ``interpreter`` (asked once, then cached):
    the directories its standard library and installed packages live in."""
    if interpreter not in _PREFIXES:
        if os.path.realpath(interpreter) == os.path.realpath(sys.executable):
            found = (sys.base_prefix, sys.prefix)
        else:
            out = subprocess.run([interpreter, "-I", "-c",
                                  "import sys; print(sys.base_prefix); print(sys.prefix)"],
                                 capture_output=True, text=True, timeout=60, check=True)
            found = tuple(out.stdout.split("\n")[:2])
        _PREFIXES[interpreter] = tuple(dict.fromkeys(found))
    return _PREFIXES[interpreter]


def view_for(executable: str, *, python: bool, extra: Sequence[str] = ()) -> View:
    """The `View` for running ``executable``: `SYSTEM_PATHS`, the executable itself when it
    lives outside them, the interpreter's prefixes when ``python``, and ``extra`` (config)."""
    paths = list(SYSTEM_PATHS) + list(extra)
    if os.path.isabs(executable):
        paths.append(executable)
        if python:
            paths += python_prefixes(executable)
    return resolve(paths, required=extra)


def _make_parents(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)


def build_root(root: str, view: View, *, uid: int, workdir_mb: int, workdir_files: int,
               tmp_mb: int) -> None:
    """Assemble the sandbox's root on a new tmpfs at ``root`` (a host directory) in the
    current, already private, mount namespace. Runs in the forked supervisor as root."""
    iso.mount("tmpfs", root, "tmpfs", iso.MS_NOSUID | iso.MS_NODEV, _ROOT_OPTIONS)
    for path in view.binds:
        target = root + path
        _make_parents(target)
        if os.path.isdir(path):
            os.makedirs(target, mode=0o755, exist_ok=True)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        iso.mount(path, target, None, iso.MS_BIND | iso.MS_REC)
    for path, target in view.links:
        _make_parents(root + path)
        os.symlink(target, root + path)
    os.mkdir(root + "/dev", 0o755)
    for name in DEVICES:
        node = f"{root}/dev/{name}"
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY, 0o644))
        iso.mount(f"/dev/{name}", node, None, iso.MS_BIND)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{root}/dev/{name}")
    for name in ("proc", "tmp", WORKDIR.strip("/")):
        os.mkdir(f"{root}/{name}", 0o755)
    iso.set_mount_attrs(root, iso.MOUNT_ATTR_RDONLY | iso.MOUNT_ATTR_NOSUID, recursive=True)
    iso.mount("tmpfs", root + "/tmp", "tmpfs", iso.MS_NOSUID | iso.MS_NODEV,
              f"size={tmp_mb}m,nr_inodes={workdir_files},mode=1777")
    iso.mount("tmpfs", root + WORKDIR, "tmpfs", iso.MS_NOSUID | iso.MS_NODEV,
              f"size={workdir_mb}m,nr_inodes={workdir_files},mode=700,uid={uid},gid={uid}")


def enter_root(root: str) -> None:
    """Make ``root`` (assembled by `build_root`) the root of this mount namespace and detach
    the host's tree from it; afterwards the process stands in `WORKDIR`."""
    os.chdir(root)
    iso.pivot_root(".", ".")
    iso.umount2(".", iso.MNT_DETACH)  # the old root, now stacked under the new one
    os.chdir(WORKDIR)


def mount_proc() -> None:
    """Mount the pid namespace's own /proc (called by the program, pid 1 of that namespace)."""
    iso.mount("proc", "/proc", "proc", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC)
