"""The sandbox's isolation, checked from inside: each test runs a real program that tries to
break out (write outside its directory, reach the network, read secrets, outlive its run,
exhaust limits) and asserts on what it could and could not do."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from k15_megatron.config.rewards import CodeRewardConfig, wall_time_limit
from k15_megatron.rewards.isolation import UidLease, processes_of
from k15_megatron.rewards.sandbox import ExecResult, Limits, execute, sandbox_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = CodeRewardConfig()


def run_py(source: str, *, stdin: bytes = b"", cfg: CodeRewardConfig = CFG,
           **limits: float) -> ExecResult:
    return execute([sys.executable, "-I", "main.py"], files={"main.py": source.encode()},
                   stdin=stdin, limits=Limits.from_config(cfg, **limits), config=cfg)


def test_stdin_stdout_and_exit_code():
    res = run_py("import sys\ndata = sys.stdin.read()\nprint(data.upper(), end='')\nsys.exit(3)",
                 stdin=b"hello")
    assert (res.stdout, res.exit_code, res.signal, res.timed_out) == (b"HELLO", 3, None, False)


def test_writes_outside_the_working_directory_fail(tmp_path):
    name = f"k15_escape_{uuid.uuid4().hex}"
    targets = [os.path.join(tempfile.gettempdir(), name), os.path.join(REPO, name),
               os.path.join("/dev/shm", name), os.path.join(str(tmp_path), name)]
    source = f"""
import json, os
results = {{}}
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("x")
        results[path] = "written"
    except OSError as err:
        results[path] = err.errno
with open("inside.txt", "w") as f:
    f.write("fine")
results["inside"] = open("inside.txt").read()
print(json.dumps(results))
"""
    res = run_py(source)
    assert res.exit_code == 0, res.stderr
    results = json.loads(res.stdout)
    assert results.pop("inside") == "fine"
    # /tmp is the sandbox's own tmpfs: writable there, never reaching the host's /tmp
    assert results.pop(targets[0]) == "written"
    assert set(results.values()) <= {errno.EROFS, errno.EACCES, errno.ENOENT}, results
    for path in targets:
        assert not os.path.exists(path)


def test_parent_secrets_do_not_reach_the_program(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("K15_TEST_API_TOKEN", secret)
    res = run_py("import os, json\nprint(json.dumps(dict(os.environ)))\n"
                 "print(open('/proc/1/environ', 'rb').read())")
    assert res.exit_code == 0, res.stderr
    env = json.loads(res.stdout.splitlines()[0])
    assert set(env) == set(sandbox_env("x"))  # exactly the minimal environment
    assert secret.encode() not in res.stdout


def test_no_network():
    source = """
import socket
for family, address in ((socket.AF_INET, ("1.1.1.1", 80)), (socket.AF_INET, ("127.0.0.1", 22))):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(address)
        print("connected", address)
    except OSError as err:
        print("refused", err.errno)
print(sorted(name for _, name in socket.if_nameindex()))
"""
    res = run_py(source)
    lines = res.stdout.decode().splitlines()
    assert lines[0] == f"refused {errno.ENETUNREACH}"
    assert lines[1] == f"refused {errno.ENETUNREACH}"  # loopback is down too
    assert lines[2] == "['lo']"


def test_runs_as_a_leased_unprivileged_uid_in_its_own_pid_namespace():
    res = run_py("import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.getpid())\n"
                 "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    ids, pids = res.stdout.decode().splitlines()
    uid, gid, groups, pid = ids.split(" ", 3)
    assert CFG.sandbox_uid_base <= int(uid) < CFG.sandbox_uid_base + CFG.num_sandbox_uids
    assert uid == gid and groups == "[]" and pid == "1"
    assert pids == "[1]"  # sees no process outside its namespace


def test_hidden_directories_stay_hidden():
    res = run_py("import os\nprint(sorted(os.listdir('/root')) if os.path.isdir('/root') "
                 "else 'none')")
    assert res.exit_code == 0, res.stderr
    visible = res.stdout.decode().strip()
    if os.stat("/root").st_mode & 0o001:  # traversable anyway: nothing to hide here
        pytest.skip("/root is world-traversable on this machine")
    # only what the interpreter needs (e.g. ['.pyenv']) is mounted in; .bashrc etc. are not
    assert ".bashrc" not in visible and ".gitconfig" not in visible


def test_daemons_do_not_outlive_the_run(sandbox_processes):
    source = """
import os, time
if os.fork() == 0:
    os.setsid()                 # leave the process group
    if os.fork() == 0:
        time.sleep(300)         # a detached grandchild
    os._exit(0)
print("parent exits")
"""
    res = run_py(source)
    assert res.stdout == b"parent exits\n" and res.exit_code == 0
    assert sandbox_processes() == []


def test_wall_clock_backstop_kills_the_whole_group(sandbox_processes):
    # sleeping uses no CPU: only the wall-clock backstop stops it
    res = run_py("import os, time\nos.fork()\nos.fork()\ntime.sleep(300)", time_limit_s=1,
                 wall_time_limit_s=1.5)
    assert res.timed_out and res.signal is not None
    assert 1.5 <= res.wall_s < 4.5
    assert sandbox_processes() == []


def test_cpu_limit_stops_a_busy_loop_by_cpu_time():
    # the CPU poll stops it at ~1.2 s of CPU, long before the rlimit (3 s) or the backstop
    res = run_py("while True:\n    pass", time_limit_s=1.2)
    assert res.timed_out and res.signal is not None
    assert res.wall_s < wall_time_limit(1.2)


def test_output_is_capped_and_overflow_kills():
    cfg = CodeRewardConfig(max_output_bytes=10_000)
    res = run_py("while True:\n    print('x' * 100)", cfg=cfg)
    assert res.output_overflow and len(res.stdout) == 10_000 and res.wall_s < 3
    res = run_py("import sys\nwhile True:\n    sys.stderr.write('e' * 100)", cfg=cfg)
    assert res.output_overflow and len(res.stderr) == 10_000


def test_fork_bomb_is_bounded_by_nproc(sandbox_processes):
    source = """
import os, time
children = 0
for _ in range(500):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
    except OSError:
        break
print(children)
"""
    res = run_py(source, time_limit_s=5)
    assert res.exit_code == 0, res.stderr
    assert int(res.stdout) < CFG.max_processes
    assert sandbox_processes() == []


def test_memory_file_size_and_open_file_limits():
    res = run_py("x = bytearray(600 << 20)", memory_mb=256)
    assert b"MemoryError" in res.stderr and res.exit_code == 1
    cfg = CodeRewardConfig(max_file_mb=1, max_open_files=16)
    res = run_py("import errno\ntry:\n    open('big', 'wb').write(b'x' * (2 << 20))\n"
                 "except OSError as e:\n    print(e.errno)", cfg=cfg)
    assert res.stdout.strip() == str(errno.EFBIG).encode()
    res = run_py("fs = []\ntry:\n    while True: fs.append(open('f%d' % len(fs), 'w'))\n"
                 "except OSError as e:\n    print(e.errno, len(fs))", cfg=cfg)
    err, count = res.stdout.split()
    assert int(err) == errno.EMFILE and int(count) <= 16


def test_uid_leases_are_exclusive():
    with UidLease(CFG.sandbox_uid_base, 2) as first, UidLease(CFG.sandbox_uid_base, 2) as second:
        assert first.uid != second.uid
        with pytest.raises(RuntimeError, match="num_sandbox_uids"):
            UidLease(CFG.sandbox_uid_base, 2, wait_s=0.05)
    with UidLease(CFG.sandbox_uid_base, 1) as again:  # released ones can be leased again
        assert again.uid == CFG.sandbox_uid_base


SYSTEM_PYTHON = shutil.which("python3.11", path="/usr/bin")
SITE_PACKAGES = next(p for p in sys.path if p.endswith("site-packages"))


@pytest.mark.skipif(os.geteuid() != 0 or SYSTEM_PYTHON is None,
                    reason="needs root to switch to an unprivileged user and /usr/bin/python3.11")
def test_without_privileges_the_sandbox_refuses_unless_allowed():
    """Run the sandbox itself as user nobody: full isolation is impossible there."""
    script = f"""
import sys
sys.path[:0] = [{REPO!r}, {SITE_PACKAGES!r}]
from k15_megatron.config.rewards import CodeRewardConfig
from k15_megatron.rewards.sandbox import Limits, SandboxError, execute
def run(cfg):
    return execute([sys.executable, "-I", "main.py"], files={{"main.py": b"print(6 * 7)"}},
                   limits=Limits.from_config(cfg), config=cfg)
try:
    run(CodeRewardConfig())
    print("RAN")
except SandboxError as err:
    print("REFUSED", err)
print("WEAK", run(CodeRewardConfig(allow_no_namespaces=True)).stdout.decode().strip())
"""
    out = subprocess.run([SYSTEM_PYTHON, "-I", "-c", script], user=65534, group=65534,
                         extra_groups=[], capture_output=True, text=True, timeout=60,
                         cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("REFUSED") and "allow_no_namespaces" in lines[0]
    assert lines[1] == "WEAK 42"


def test_total_disk_use_and_file_count_are_bounded():
    cfg = CodeRewardConfig(max_workdir_mb=8, max_workdir_files=100, max_file_mb=4)
    source = """
import errno
written = 0
try:
    for i in range(100):
        with open(f"chunk{i}", "wb") as f:
            f.write(b"x" * (3 << 20))
        written += 3
except OSError as err:
    print(err.errno, written)
made = 0
try:
    for i in range(1000):
        open(f"empty{i}", "w").close()
        made += 1
except OSError as err:
    print(err.errno, made)
"""
    res = run_py(source, cfg=cfg)
    (err1, written), (err2, made) = [line.split() for line in res.stdout.decode().splitlines()]
    assert int(err1) == errno.ENOSPC and int(written) <= 8
    assert int(err2) == errno.ENOSPC and int(made) < 100


def test_collected_files_are_regular_files_only():
    source = ("import os\nopen('real.bin', 'wb').write(b'payload')\n"
              "os.symlink('/etc/hostname', 'link')\nos.mkfifo('fifo')")
    res = execute([sys.executable, "-I", "main.py"], files={"main.py": source.encode()},
                  limits=Limits.from_config(CFG), config=CFG,
                  collect=["real.bin", "link", "fifo", "missing"])
    assert res.exit_code == 0, res.stderr
    assert res.files == {"real.bin": b"payload"}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or SYSTEM_PYTHON is None,
                    reason="needs root, util-linux setpriv to drop CAP_SYS_ADMIN and /usr/bin/python3.11")
def test_root_without_namespaces_still_runs_the_program_as_an_unprivileged_uid(tmp_path):
    """A root trainer in a container without CAP_SYS_ADMIN (no namespaces) under
    allow_no_namespaces: the program must not run as root, the per-uid process limit must hold,
    and a process that left the run's process group must be gone afterwards. The program is
    the system's Python: the leased uid cannot reach an interpreter under /root."""
    guarded = tmp_path / "guarded"
    guarded.mkdir(mode=0o755)
    program = (
        "import os, sys, time\n"
        "print(os.getuid())\n"
        f"try:\n    open({str(guarded / 'x')!r}, 'w')\n    print('wrote')\n"
        "except PermissionError:\n    print('denied')\n"
        "n = 0\ntry:\n    while n < 100:\n        if os.fork() == 0:\n            os.closerange(0, 3); time.sleep(30); os._exit(0)\n"
        "        n += 1\nexcept OSError:\n    pass\nprint(n)\nsys.stdout.flush()\n"
        "if os.fork() == 0:\n    os.closerange(0, 3); os.setsid(); time.sleep(60); os._exit(0)\n")
    script = f"""
import sys
sys.path[:0] = [{REPO!r}]
from k15_megatron.config.rewards import CodeRewardConfig
from k15_megatron.rewards.sandbox import Limits, execute, protections
cfg = CodeRewardConfig(allow_no_namespaces=True, sandbox_uid_base=62000, max_processes=8)
print("namespaces", protections(cfg).namespaces)
res = execute([{SYSTEM_PYTHON!r}, "-I", "main.py"], files={{"main.py": {program.encode()!r}}}, limits=Limits.from_config(cfg),
              config=cfg)
print(res.stdout.decode().strip().replace(chr(10), " "))
"""
    out = subprocess.run(["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "namespaces False"
    uid, wrote, forks = lines[1].split()
    assert 62000 <= int(uid) < 62000 + 64 and wrote == "denied" and int(forks) < 8, lines[1]
    assert not (guarded / "x").exists()
    survivors = processes_of(int(uid))
    assert [p for p, state in survivors if state != "Z"] == [], survivors


def test_a_large_caller_does_not_count_against_the_program_s_memory():
    """The program's process starts as a fork of the caller: until execve it maps the caller's
    whole resident set (a trainer's gigabytes), which the tree-memory watch must not count."""
    script = f"""
import sys
sys.path[:0] = [{REPO!r}]
big = bytearray(800 << 20)
for i in range(0, len(big), 4096):
    big[i] = 1
from k15_megatron.config.rewards import CodeRewardConfig
from k15_megatron.rewards.sandbox import Limits, execute
cfg = CodeRewardConfig(memory_mb=256)
outs = [execute([sys.executable, "-I", "main.py"], files={{"main.py": b"print(42)"}},
                limits=Limits.from_config(cfg), config=cfg).stdout.strip() for _ in range(5)]
print(outs.count(b"42"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "5"
