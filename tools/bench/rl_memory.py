"""Host memory of a long `k15 rl` run after warm-up: the product's engine set-up vs oneDNN's default.

Both sides run the same one-process `k15 rl` (the CLI, ``examples/tiny.yaml`` on a random tiny
model, the arithmetic task, ``--iterations`` iterations of 4 prompts x 4 samples) and differ only
in ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``:

- ours: unset, so ``rollout/build.py`` caps oneDNN's process-wide primitive cache at
  ``ONEDNN_CACHE_CAPACITY`` (64) before the engine is built, what every `k15` job does;
- baseline: 1024, oneDNN's own default, which keeps one primitive per new matmul shape that vLLM's
  CPU scheduler steps bring (docs/memory.md).

Growth is read from ``memory/mem_anon_gib`` (rank 0's anonymous resident memory, logged every
iteration; ``mem_peak_gib`` is a high-water mark and can only rise): a least-squares line through
the iterations after ``--warmup``, times the span, in MiB. The bench also prints whether ours
stays flat by the bar docs/memory.md states (fitted growth < 24 MiB, no iteration more than
64 MiB above the warm-up's peak) and exits 1 when it does not.

Run: python tools/bench/rl_memory.py [--iterations 80 --warmup 30]  (11 minutes for both runs on the
2-core CPU machine while other jobs loaded it). The last line is the RESULT line (unit MiB of growth after warm-up,
ratio = ours / baseline). CPU only: on a GPU the matmuls are not oneDNN's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_GROWTH_MIB = 24.0
MAX_EXCESS_MIB = 64.0
ONEDNN_DEFAULT_CAPACITY = "1024"


def _write_task(folder: str) -> str:
    """64 arithmetic RL prompts (2-4 operands) in ``folder/train.jsonl``; returns the path."""
    from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits
    from k15_megatron.data.jsonl import write_jsonl

    cfg = ArithmeticTaskConfig(num_sft=0, num_train=64, num_eval=0, max_operands=4,
                               reward="k15_megatron.rewards.arithmetic:arithmetic_reward")
    path = os.path.join(folder, "train.jsonl")
    write_jsonl(path, generate_splits(cfg)["train"])
    return path


def run_side(name: str, folder: str, train_path: str, iterations: int, env_extra: dict) -> np.ndarray:
    """Run `k15 rl` and return rank 0's anonymous memory per iteration, MiB, shape [iterations]."""
    run_dir = os.path.join(folder, name)
    cmd = [sys.executable, "-m", "k15_megatron.cli", "rl", "examples/tiny.yaml", f"run_dir={run_dir}",
           f"data.train_path={train_path}", "parallel.world_size=1", "rollout.max_response_tokens=16",
           "rollout.max_model_len=96", "rollout.cpu_kv_cache_gib=0.25", "rl.group_size=4",
           "rl.prompts_per_iteration=4", f"rl.iterations={iterations}", "checkpoint.save_interval=0",
           "logging.tensorboard=false", "logging.log_interval=20", "engine.check_num_sequences=1",
           "rl.repeat.enabled=false"]
    env = {key: value for key, value in os.environ.items() if key != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**env, **env_extra})
    if proc.returncode != 0:
        raise SystemExit(f"rl_memory: the {name} run failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        loop = [r for r in map(json.loads, f) if "memory/mem_anon_gib" in r]
    if [r["iteration"] for r in loop] != list(range(1, iterations + 1)):
        raise SystemExit(f"rl_memory: the {name} run did not log memory every iteration")
    return np.array([r["memory/mem_anon_gib"] for r in loop]) * 1024


def growth_after_warmup(anon_mib: np.ndarray, warmup: int) -> tuple[float, float]:
    """(fitted growth over the iterations after ``warmup``, largest excess over the warm-up's
    peak), both MiB; ``anon_mib`` has shape [iterations] with iterations > warmup + 1."""
    late = np.arange(warmup, len(anon_mib))
    slope = np.polyfit(late, anon_mib[warmup:], 1)[0]
    return float(slope * (len(late) - 1)), float(anon_mib[warmup:].max() - anon_mib[:warmup].max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args(argv)
    if args.iterations < args.warmup + 2:
        parser.error("--iterations must exceed --warmup by at least 2")
    with tempfile.TemporaryDirectory() as folder:
        train_path = _write_task(folder)
        results = {}
        for name, env in (("ours", {}), ("baseline", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ONEDNN_DEFAULT_CAPACITY})):
            anon = run_side(name, folder, train_path, args.iterations, env)
            results[name] = growth_after_warmup(anon, args.warmup)
            print(f"{name}: anonymous memory {anon[0]:.0f} -> {anon[-1]:.0f} MiB; after iteration {args.warmup}: "
                  f"fitted growth {results[name][0]:.1f} MiB, peak {results[name][1]:+.1f} MiB over the warm-up's",
                  flush=True)
    growth, excess = results["ours"]
    flat = growth < MAX_GROWTH_MIB and excess < MAX_EXCESS_MIB
    print(f"ours flat (growth < {MAX_GROWTH_MIB:g} MiB, excess < {MAX_EXCESS_MIB:g} MiB): {'yes' if flat else 'NO'}")
    baseline = results["baseline"][0]
    ratio = growth / baseline if baseline else float("nan")
    print(f"RESULT rl_memory_growth ours={growth:.2f} baseline={baseline:.2f} unit=MiB ratio={ratio:.3f}")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
