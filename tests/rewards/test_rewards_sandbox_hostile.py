"""Hostile programs through the real code reward: each tries what a reward-hacking policy would
(read gold answers or the project's source from outside its directory, look at other runs,
create namespaces, reach kernel interfaces, write outside its directory, exhaust processes or
memory across its process tree) in one batch with benign programs. Each attack must end as the
program's own verdict, the benign programs must pass, and nothing may be left running."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from k15_megatron.config.rewards import CodeRewardConfig, RewardsConfig
from k15_megatron.rewards import fsview
from k15_megatron.rewards.code import Verdict, isolation_metrics, run_tests_batch
from k15_megatron.rewards.limits import detect_cgroup
from k15_megatron.rewards.sandbox import Limits, SandboxError, execute

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# uids of their own, so that sandboxes of other processes on the machine never count as leftovers
CFG = CodeRewardConfig(memory_mb=512, sandbox_uid_base=63000)
SYSCALLS = {"x86_64": {"bpf": 321, "keyctl": 250, "perf_event_open": 298},
            "aarch64": {"bpf": 280, "keyctl": 219, "perf_event_open": 241}}[os.uname().machine]

BENIGN = {
    "humaneval": ("def add(a, b):\n    return a + b\n", [{"assert": "assert add(2, 3) == 5"}]),
    "numpy": ("import numpy as np\nprint(int(np.arange(int(input())).sum()))\n",
              [{"input": "10\n", "output": "45"}]),
    "threads": ("import threading\nout = []\n"
                "ts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]\n"
                "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(sum(out))\n",
                [{"input": "", "output": "28"}]),
    "stdin_to_eof": ("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))\n",
                     [{"input": "1 2\n3\n4 5 6\n", "output": "21"}]),
}


def _syscall_attack(name: str, args: str = "0, 0, 0, 0") -> str:
    return (f"import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"if libc.syscall({SYSCALLS.get(name, -1)}, {args}) < 0:\n"
            f"    e = ctypes.get_errno()\n    raise OSError(e, '{name}: ' + os.strerror(e))\n"
            f"print('42')\n")


def leftover_processes() -> list[int]:
    """Live processes whose real uid is one of CFG's sandbox uids."""
    uids = range(CFG.sandbox_uid_base, CFG.sandbox_uid_base + CFG.num_sandbox_uids)
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as handle:
                real_uid = next(int(line.split()[1]) for line in handle
                                if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue  # exited while we looked
        if real_uid in uids:
            found.append(int(entry))
    return found


@pytest.fixture
def planted_data():
    """A world-readable data set with gold answers in a world-traversable host folder."""
    folder = tempfile.mkdtemp(prefix="k15-planted-", dir="/var/tmp")
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "rl_train.jsonl")
    gold = f"gold-{uuid.uuid4().hex}"
    with open(path, "w") as handle:
        handle.write(gold + "\n")
    os.chmod(path, 0o644)
    yield path, gold
    shutil.rmtree(folder)


def test_hostile_programs_are_contained_and_benign_ones_pass(planted_data):
    data_path, gold = planted_data
    escape = f"k15_escape_{uuid.uuid4().hex}"
    outside = [os.path.join("/usr", escape), os.path.join(REPO, escape),
               os.path.join("/var/tmp", escape), os.path.join("/dev/shm", escape)]
    source = os.path.join(REPO, "k15_megatron", "rewards", "sandbox.py")
    hostile = {
        # the gold answer is the expected output: reading it back would pass
        "read_planted_data": (f"print(open({data_path!r}).read())",
                              [{"input": "", "output": gold}]),
        "read_project_source": (f"print(open({source!r}).read()[:20])",
                                [{"input": "", "output": '"""Run one untrusted'}]),
        # other runs of the batch are running now; seeing any of them would be a wrong answer
        "list_other_runs": ("import os\nnames = sorted(os.listdir('/tmp')) + "
                            f"sorted(os.listdir({tempfile.gettempdir()!r}))\n"
                            "print([n for n in names if n.startswith('k15-sandbox')] or 'none')",
                            [{"input": "", "output": "none"}]),
        "user_namespace": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                           "if libc.unshare(0x10000000) != 0:\n"
                           "    e = ctypes.get_errno()\n    raise OSError(e, os.strerror(e))\n"
                           "print('root in a namespace')", [{"input": "", "output": "x"}]),
        "bpf": (_syscall_attack("bpf"), [{"input": "", "output": "42"}]),
        "keyctl": (_syscall_attack("keyctl"), [{"input": "", "output": "42"}]),
        "perf_event_open": (_syscall_attack("perf_event_open"), [{"input": "", "output": "42"}]),
        "ptrace": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                   "if libc.ptrace(0, 0, 0, 0) != 0:\n"  # PTRACE_TRACEME
                   "    e = ctypes.get_errno()\n    raise OSError(e, os.strerror(e))\n"
                   "print('42')", [{"input": "", "output": "42"}]),
        "raw_socket": ("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_RAW, 1)\n"
                       "print('42')", [{"input": "", "output": "42"}]),
        "packet_socket": ("import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)\n"
                          "print('42')", [{"input": "", "output": "42"}]),
        "write_outside": ("import errno\nfails = []\n"
                          f"for path in {outside!r}:\n"
                          "    try:\n        open(path, 'w').write('x')\n"
                          "    except OSError as err:\n        fails.append(err.errno)\n"
                          "print(len(fails))",
                          [{"input": "", "output": "0"}]),
        "fork_bomb": ("import os, time\nwhile True:\n    if os.fork() == 0:\n"
                      "        time.sleep(60)\n        os._exit(0)",
                      [{"input": "", "output": "42"}]),
        "memory_bomb_tree": ("import os\npids = []\nfor _ in range(4):\n    pid = os.fork()\n"
                             "    if pid == 0:\n        x = bytearray(700 << 20)\n"
                             "        os._exit(0)\n    pids.append(pid)\n"
                             "if any(os.waitpid(p, 0)[1] for p in pids):\n"
                             "    raise MemoryError('a child ran out of memory')\nprint('42')",
                             [{"input": "", "output": "42"}]),
        # every process stays under the per-process limit; together they exceed memory_mb
        "memory_bomb_tree_total": ("import os, time\nfor _ in range(5):\n"
                                   "    if os.fork() == 0:\n"
                                   "        x = b'x' * (200 << 20)\n        time.sleep(30)\n"
                                   "        os._exit(0)\nwhile True:\n    os.wait()",
                                   [{"input": "", "output": "42"}]),
    }
    programs = {**hostile, **BENIGN}
    names = list(programs)
    results = run_tests_batch([programs[n][0] for n in names], [programs[n][1] for n in names],
                              config=CFG, time_limit_s=5)
    by_name = dict(zip(names, results))
    verdicts = {n: str(r.verdicts[0]) for n, r in by_name.items()}
    for name in BENIGN:
        assert verdicts[name] == "passed", (name, by_name[name].stderr_tails)
    for name in ("read_planted_data", "read_project_source"):
        assert verdicts[name] == "runtime_error", (name, by_name[name].stdout)
        assert "FileNotFoundError" in by_name[name].stderr_tails[0]
    assert verdicts["list_other_runs"] == "passed", by_name["list_other_runs"].stdout
    for name in ("user_namespace", "bpf", "keyctl", "perf_event_open", "ptrace", "raw_socket",
                 "packet_socket"):
        assert verdicts[name] == "runtime_error", (name, by_name[name].stdout)
        assert "Operation not permitted" in by_name[name].stderr_tails[0], \
            (name, by_name[name].stderr_tails)
    assert verdicts["write_outside"] == "wrong_answer"
    assert by_name["write_outside"].stdout[0].split() == [str(len(outside))]
    for path in outside:
        assert not os.path.exists(path)
    assert verdicts["fork_bomb"] in ("runtime_error", "time_limit"), by_name["fork_bomb"]
    assert verdicts["memory_bomb_tree"] == "memory_limit", by_name["memory_bomb_tree"]
    assert verdicts["memory_bomb_tree_total"] == "memory_limit", by_name["memory_bomb_tree_total"]
    assert leftover_processes() == []


def test_isolation_metrics_report_every_protection():
    metrics = isolation_metrics(CFG)
    assert set(metrics) == {f"rewards/code/isolation/{p}" for p in
                            ("namespaces", "filesystem_allowlist", "seccomp", "cgroup")}
    assert metrics["rewards/code/isolation/namespaces"] == 1.0
    assert metrics["rewards/code/isolation/filesystem_allowlist"] == 1.0
    assert metrics["rewards/code/isolation/seccomp"] == 1.0
    assert metrics["rewards/code/isolation/cgroup"] == float(detect_cgroup(CFG)[0] is not None)


def test_readonly_paths_extend_the_allow_list(planted_data):
    data_path, gold = planted_data
    folder = os.path.dirname(data_path)
    os.chmod(data_path, 0o666)  # writable by anyone on the host: only the mount refuses
    cfg = CodeRewardConfig(sandbox_readonly_paths=[folder])
    res = execute([sys.executable, "-I", "main.py"],
                  files={"main.py": f"print(open({data_path!r}).read().strip())\n"
                                    f"open({data_path!r}, 'a')".encode()},
                  limits=Limits.from_config(cfg), config=cfg)
    assert res.stdout.decode().strip() == gold
    assert b"Read-only file system" in res.stderr
    typo = CodeRewardConfig(sandbox_readonly_paths=[folder + "-typo"])  # refused, not skipped
    with pytest.raises(SandboxError, match=r"sandbox_readonly_paths.*-typo' does not exist"):
        execute([sys.executable, "-I", "main.py"], files={"main.py": b"print(1)"},
                limits=Limits.from_config(typo), config=typo)
    root = RewardsConfig(code=CodeRewardConfig(sandbox_readonly_paths=["/"])).validate()
    assert any(e.startswith("rewards.code.sandbox_readonly_paths") and "'/'" in e for e in root), root


def test_the_root_holds_only_the_allow_list():
    res = execute([sys.executable, "-I", "main.py"],
                  files={"main.py": b"import os\nprint(sorted(os.listdir('/')))\n"
                                    b"print(sorted(os.listdir('/dev')))"},
                  limits=Limits.from_config(CFG), config=CFG)
    top, dev = (eval(line) for line in res.stdout.decode().splitlines())
    expected = {p.strip("/").split("/")[0] for p in fsview.SYSTEM_PATHS + (sys.prefix,
                                                                           sys.base_prefix)
                if os.path.lexists(p)}
    assert set(top) == expected | {"dev", "proc", "tmp", fsview.WORKDIR.strip("/")}
    assert set(dev) == set(fsview.DEVICES) | {"fd", "stdin", "stdout", "stderr"}


def test_cpp_compiles_and_runs_under_the_system_allow_list():
    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine")
    program = ("#include <iostream>\n#include <fstream>\nint main() { long a, b; "
               "std::cin >> a >> b; std::ifstream f(\"/etc/hostname\"); "
               "std::cout << a + b << (f ? \" leak\" : \"\") << std::endl; }\n")
    (result,) = run_tests_batch([program], [[{"input": "2 40", "output": "42"}]],
                                language="cpp", config=CFG)
    assert result.verdicts == [Verdict.PASSED], (result.error, result.stdout)


def test_missing_seccomp_refuses_unless_allowed():
    """libseccomp's binding unavailable (as on a machine without libseccomp2): the sandbox
    refuses with the opt-out key, and runs without the filter only when it is set."""
    script = """
import sys
sys.modules["pyseccomp"] = None  # importing it now raises ImportError
from k15_megatron.config.rewards import CodeRewardConfig, RewardsConfig
from k15_megatron.rewards.sandbox import Limits, SandboxError, execute, protections
def run(cfg):
    return execute([sys.executable, "-I", "main.py"], files={"main.py": b"print(6 * 7)"},
                   limits=Limits.from_config(cfg), config=cfg)
try:
    run(CodeRewardConfig())
    print("RAN")
except SandboxError as err:
    print("REFUSED", err)
cfg = CodeRewardConfig(allow_no_seccomp=True)
print("WEAK", run(cfg).stdout.decode().strip(), protections(cfg).seccomp)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("REFUSED") and "rewards.code.allow_no_seccomp" in lines[0]
    assert lines[1] == "WEAK 42 False"


def test_required_cgroup_refuses_where_the_machine_has_none():
    cfg = CodeRewardConfig(limits_backend="cgroup", cgroup_parent="/nonexistent-cgroup")
    with pytest.raises(SandboxError, match="rewards.code.limits_backend"):
        execute(["/bin/true"], files={}, limits=Limits.from_config(cfg), config=cfg)


def test_allow_list_resolution():
    view = fsview.resolve(["/bin", "/usr", "/usr/bin", "/does/not/exist"])
    if os.path.islink("/bin"):
        assert ("/bin", os.readlink("/bin")) in view.links
    assert "/usr" in view.binds and "/usr/bin" not in view.binds  # covered by /usr
    with pytest.raises(ValueError, match="would cover"):
        fsview.resolve(["/tmp/data"])
    with pytest.raises(ValueError, match="not an absolute path"):
        fsview.resolve(["data"])
