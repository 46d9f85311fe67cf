"""Host memory of a long `k15 rl` run stays flat after warm-up (one CPU process, the CLI).

``memory/mem_peak_gib`` on CPU is ``ru_maxrss``, a high-water mark: it can only rise. Growth is
read from ``memory/mem_anon_gib``, the anonymous resident memory of rank 0 logged every
iteration (heap and tensors; the total RSS also counts mapped library pages that the kernel
drops and reloads under memory pressure, which makes it jump by hundreds of MiB on a loaded
machine). After a warm-up of WARMUP iterations, a least-squares line through the anonymous
memory of the remaining iterations must rise by less than MAX_GROWTH_MIB over that span, and no
iteration may exceed the warm-up's maximum by more than MAX_EXCESS_MIB.

Before the engine capped oneDNN's primitive cache (rollout/build.py, ONEDNN_CACHE_CAPACITY)
vLLM's generate loop in this process kept about 1 MiB more per iteration while the cache
filled with primitives for new batch shapes (docs/memory.md); the fitted growth then exceeded
MAX_GROWTH_MIB.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from tooling import REPO_ROOT

from rl_runs import write_task

ITERATIONS, WARMUP = 80, 30
MAX_GROWTH_MIB = 24.0
MAX_EXCESS_MIB = 64.0


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_long_rl_run_memory_stays_flat_after_warm_up(tmp_path):
    write_task(str(tmp_path))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "k15_megatron.cli", "rl", "examples/tiny.yaml", f"run_dir={run_dir}",
           f"data.train_path={tmp_path}/train.jsonl", "parallel.world_size=1",
           "rollout.max_response_tokens=16", "rollout.max_model_len=96", "rollout.cpu_kv_cache_gib=0.25",
           "rl.group_size=4", "rl.prompts_per_iteration=4", f"rl.iterations={ITERATIONS}",
           "checkpoint.save_interval=0", "logging.tensorboard=false", "logging.log_interval=20",
           "engine.check_num_sequences=1", "rl.repeat.enabled=false"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]

    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    loop = [r for r in records if "memory/mem_anon_gib" in r]
    assert [r["iteration"] for r in loop] == list(range(1, ITERATIONS + 1))
    assert sum("train/loss" in r for r in loop) > ITERATIONS // 2, "the run did not train"
    anon = np.array([r["memory/mem_anon_gib"] for r in loop]) * 1024
    late = np.arange(WARMUP, ITERATIONS)
    slope = np.polyfit(late, anon[WARMUP:], 1)[0]
    growth = slope * (len(late) - 1)
    excess = anon[WARMUP:].max() - anon[:WARMUP].max()
    assert growth < MAX_GROWTH_MIB, f"anonymous memory grows {slope:.3f} MiB/iteration after warm-up"
    assert excess < MAX_EXCESS_MIB, f"after warm-up memory rose {excess:.0f} MiB above the warm-up's peak"
