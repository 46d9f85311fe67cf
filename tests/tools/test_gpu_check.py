"""The GPU check kit (tools/gpu_check.sh -> tools/gpu_check.py) runs on this CPU machine, so
it cannot rot between the rare runs on a GPU (docs/gpu.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _kit():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_sh(*args, timeout=120):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", "tools/gpu_check.sh", "--no-install", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _lines(stdout: str) -> dict[str, str]:
    """check -> PASS/FAIL/SKIP from the kit's one-line-per-check output."""
    out = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL", "SKIP"):
            out[rest.split(":")[0]] = status
    return out


def test_without_cuda_the_kit_refuses_unless_allowed(tmp_path):
    if _kit()._use_cuda():
        pytest.skip("CUDA is present")
    proc = _run_sh("--out", str(tmp_path))
    assert proc.returncode == 1
    assert _lines(proc.stdout) == {"install": "PASS", "cuda": "FAIL"}


def test_the_kit_never_clears_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    assert _kit().main(["--out", str(tmp_path), "--checks", "sft"]) == 2
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine"


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path, capsys):
    kit = _kit()

    def broken(out):
        raise RuntimeError("boom")

    kit.CHECK_FUNCS = {**kit.CHECK_FUNCS, "sft": broken}
    assert kit.run_check("sft", tmp_path)["status"] == "FAIL"
    assert "FAIL sft: RuntimeError: boom" in capsys.readouterr().out
    assert "tests/models/test_models_gpu.py" in kit.gpu_test_files()


@pytest.mark.slow
def test_the_whole_kit_runs_on_cpu(tmp_path):
    if _kit()._use_cuda():
        pytest.skip("CUDA is present: run the kit itself (docs/gpu.md)")
    proc = _run_sh("--allow-cpu", "--out", str(tmp_path), timeout=3000)
    assert _lines(proc.stdout) == {
        "install": "PASS", "sft": "PASS", "resume": "PASS", "ref_logprobs": "PASS", "policy_update": "PASS",
        "fp8": "SKIP", "pytest_gpu": "SKIP", "all": "PASS"}, proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["check"] for r in results["results"]] == list(_kit().CHECKS)
    assert (tmp_path / "work" / "rollout_batch.pt").exists()
