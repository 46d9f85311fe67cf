"""GPU check kit: the product's GPU path, checked in a few minutes on one CUDA GPU.

Usage (docs/gpu.md; ``tools/gpu_check.sh`` installs the carried wheels first)::

    python tools/gpu_check.py [--out DIR] [--checks sft,resume,...] [--allow-cpu]

Each check runs in its own process and prints one line, ``PASS|FAIL|SKIP <check>: <detail>``;
``DIR/results.json`` records them with the machine (card, compute capability, versions); the runs
and their logs are in ``DIR/work``. The exit status is 1 when a check failed. The checks:

* ``sft``: ``k15 sft`` on the tiny Qwen2-style model (examples/tiny.yaml) for 4 steps (bf16 on
  CUDA, fp32 on CPU), saving at steps 2 and 4: exits 0, every loss finite, the loss falls.
* ``resume``: the same run resumed from its step-4 checkpoint to step 6 against a run trained
  straight to step 6: the losses of steps 5 and 6 agree within 1e-4 (relative; GPU atomics may
  differ in the last bits, a lost optimizer state or schedule would not stay that close).
* ``ref_logprobs``: the reference log-prob recompute
  (:func:`k15_megatron.train.logprobs.sequence_token_logprobs`) on the recorded rollout batch,
  in micro-batches and whole, against a float64 log-softmax of the model's own logits (fp32).
* ``policy_update``: :func:`k15_megatron.train.policy_update.update_policy` on the recorded
  batch, three times: finite metrics, no behaviour/recompute drift on the first call, and the
  sequence log-probs of rewarded responses rise relative to unrewarded ones.
* ``fp8``: ``k15 sft`` with ``precision.fp8=hybrid`` (bf16) for 4 steps, when Transformer
  Engine is importable on a GPU of compute capability >= 8.9 (else SKIP with the reason).
* ``pytest_gpu``: ``pytest -m gpu`` over the test files that carry the marker.

The recorded rollout batch is built deterministically from the arithmetic task: 2 prompts x 4
responses (2 correct, reward 1; 2 with a slip, reward 0) through the real
:class:`k15_megatron.rl.replay.SegmentReplayBuffer`; its behaviour log-probs are the model's own
recomputed ones (as a rollout engine with synced weights would give), and it is saved with
``torch.save`` as ``DIR/work/rollout_batch.pt``.

``--allow-cpu`` runs every check on the CPU (gloo) so the kit is exercised where no GPU is
(tests/tools/test_gpu_check.py); ``fp8`` and ``pytest_gpu`` then SKIP.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
CHECKS = ("sft", "resume", "ref_logprobs", "policy_update", "fp8", "pytest_gpu")
CHECK_TIMEOUT_S = 240
"""Seconds one check's process may run on a GPU (``--timeout``; 1800 on a CPU)."""
ENV = {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning"}


class Skip(Exception):
    """A check that cannot run on this machine (the message says why)."""


# -- machine -------------------------------------------------------------------------------------
def machine_info() -> dict:
    """Card, compute capability and versions of everything the checks use."""
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": "cpu", "compute_capability": None}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    for dist in ("megatron-core", "transformer_engine", "transformers", "omegaconf", "pytest"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = None
    return info


def _use_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- k15 sft runs --------------------------------------------------------------------------------
def _write_sft_data(out: Path) -> Path:
    from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits
    from k15_megatron.data.jsonl import write_jsonl

    path = out / "data" / "sft.jsonl"
    if not path.exists():
        task = ArithmeticTaskConfig(seed=0, num_sft=256, num_train=0, num_eval=0)
        write_jsonl(str(path), generate_splits(task)["sft"])
    return path


def run_sft(out: Path, name: str, *, iters: int, extra=()) -> tuple[int, list[dict], str]:
    """``k15 sft examples/tiny.yaml`` in ``out/name``; returns (exit status, metrics records, log tail)."""
    data = _write_sft_data(out)
    dtype = "bf16" if _use_cuda() else "fp32"
    args = [sys.executable, "-m", "k15_megatron.cli", "sft", str(TINY), f"run_dir={out / name}",
            f"data.train_path={data}", f"optim.train_iters={iters}", "optim.lr=2e-3",
            "checkpoint.save_interval=2", "data.global_batch_size=4", "data.micro_batch_size=2",
            "logging.tensorboard=false", "seed=0", f"precision.dtype={dtype}", *extra]
    proc = subprocess.run(args, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True,
                          timeout=CHECK_TIMEOUT_S)
    metrics_path = out / name / "metrics.jsonl"
    records = []
    if metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    return proc.returncode, records, (proc.stdout + proc.stderr)[-1500:]


def _losses(records) -> dict[int, float]:
    return {r["iteration"]: r["train/loss"] for r in records if "train/loss" in r}


def _trained(out: Path, name: str, iters: int, extra=()) -> dict[int, float]:
    status, records, tail = run_sft(out, name, iters=iters, extra=extra)
    if status != 0:
        raise AssertionError(f"k15 sft exited {status}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
    losses = _losses(records)
    if sorted(losses) != list(range(1, iters + 1)) or not all(map(math.isfinite, losses.values())):
        raise AssertionError(f"expected finite losses for steps 1..{iters}, got {losses}")
    return losses


def check_sft(out: Path) -> str:
    losses = _trained(out, "sft", 4)
    ckpts = sorted(p.name for p in (out / "sft" / "checkpoints").iterdir() if p.is_dir())
    if len(ckpts) < 2:
        raise AssertionError(f"expected checkpoints at steps 2 and 4, found {ckpts}")
    if not losses[4] < losses[1]:
        raise AssertionError(f"loss did not fall: {losses}")
    return f"4 steps, loss {losses[1]:.3f} -> {losses[4]:.3f}, checkpoints {ckpts}"


def check_resume(out: Path) -> str:
    if not (out / "sft" / "checkpoints").exists():
        _trained(out, "sft", 4)
    resumed = _trained(out, "sft", 6)
    log = (out / "sft.log").read_text()
    if "resumed from" not in log:
        raise AssertionError("the second k15 sft did not resume from the step-4 checkpoint")
    straight = _trained(out, "sft_straight", 6)
    diffs = [abs(resumed[i] - straight[i]) / max(abs(straight[i]), 1e-12) for i in (5, 6)]
    if max(diffs) > 1e-4:
        raise AssertionError(f"steps 5-6 after resume {resumed[5]:.6f}, {resumed[6]:.6f} vs straight "
                             f"{straight[5]:.6f}, {straight[6]:.6f}")
    return f"steps 5-6 after resume match a straight run (max relative difference {max(diffs):.1e})"


def check_fp8(out: Path) -> str:
    import importlib.util

    import torch

    if importlib.util.find_spec("transformer_engine") is None:
        raise Skip("transformer_engine is not importable (FP8 needs Transformer Engine)")
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    cc = torch.cuda.get_device_capability(0)
    if cc < (8, 9):
        raise Skip(f"compute capability {cc[0]}.{cc[1]} < 8.9 has no FP8")
    losses = _trained(out, "fp8", 4, extra=("precision.fp8=hybrid", "precision.fp8_recipe=delayed",
                                             "precision.dtype=bf16"))
    if not losses[4] < losses[1]:
        raise AssertionError(f"FP8 loss did not fall: {losses}")
    return f"hybrid/delayed, 4 steps, loss {losses[1]:.3f} -> {losses[4]:.3f}"


# -- pytest -m gpu -------------------------------------------------------------------------------
def gpu_test_files() -> list[str]:
    """Test files that carry the ``gpu`` marker."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def check_pytest_gpu(out: Path) -> str:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        raise AssertionError("pytest is not installed")
    files = gpu_test_files()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                          cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True,
                          timeout=CHECK_TIMEOUT_S)
    (out / "pytest_gpu.log").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {summary}")
    if not _use_cuda():
        raise Skip(f"no CUDA, the gpu tests skip themselves ({summary})")
    return f"{len(files)} files: {summary}"


# -- the in-process RL checks --------------------------------------------------------------------
def run_worker(name: str, out: Path) -> str:
    """Run ``gpu_check_rl.<name>`` in a fresh process (its own process group and model)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_check_rl.py")), name, str(out)],
                          cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True,
                          timeout=CHECK_TIMEOUT_S)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        raise AssertionError(f"exit {proc.returncode}: {tail[-1] if tail else '(no output)'}")
    return lines[-1][len("RESULT "):]


CHECK_FUNCS = {
    "sft": check_sft,
    "resume": check_resume,
    "ref_logprobs": lambda out: run_worker("ref_logprobs", out),
    "policy_update": lambda out: run_worker("policy_update", out),
    "fp8": check_fp8,
    "pytest_gpu": check_pytest_gpu,
}


def run_check(name: str, out: Path) -> dict:
    """One check -> {"check", "status", "detail", "seconds"}; prints its line."""
    begin = time.perf_counter()
    try:
        status, detail = "PASS", CHECK_FUNCS[name](out)
    except Skip as exc:
        status, detail = "SKIP", str(exc)
    except subprocess.TimeoutExpired:
        status, detail = "FAIL", f"timed out after {CHECK_TIMEOUT_S} s"
    except Exception as exc:  # a failed check is reported, the others still run
        status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - begin
    print(f"{status} {name}: {detail} ({seconds:.0f} s)", flush=True)
    return {"check": name, "status": status, "detail": detail, "seconds": round(seconds, 1)}


def _set_timeout(seconds: int) -> None:
    global CHECK_TIMEOUT_S
    CHECK_TIMEOUT_S = seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "gpu_check"), help="work and results folder")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA")
    parser.add_argument("--timeout", type=int, default=None,
                        help=f"seconds per check process (default {CHECK_TIMEOUT_S} on a GPU, 1800 on a CPU)")
    args = parser.parse_args(argv)
    _set_timeout(args.timeout or (CHECK_TIMEOUT_S if _use_cuda() else 1800))
    checks = [c for c in args.checks.split(",") if c]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {CHECKS}")
    out = Path(args.out).resolve()
    marker = out / ".k15-gpu-check"  # the folder is the kit's: it may replace its work/ and results
    if out.is_dir() and any(out.iterdir()) and not marker.exists():
        print(f"error: --out {out} is a non-empty folder the GPU check kit did not make; choose a new "
              "or empty folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    work = out / "work"  # the runs of this invocation; a previous one's are removed
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    info = machine_info()
    print("INFO machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    if not _use_cuda() and not args.allow_cpu:
        print("FAIL cuda: torch sees no CUDA device (use --allow-cpu to exercise the kit on a CPU)")
        return 1
    results = [run_check(name, work) for name in checks]
    (out / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=2))
    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    print(f"{'FAIL' if failed else 'PASS'} all: {len(results) - len(failed)}/{len(results)} checks did not fail"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
