"""The README's main job (`k15 demo`) runs end to end: build, convert under TP=2, train, export."""

import os
import re
import subprocess
import sys

import pytest
from tooling import REPO_ROOT


@pytest.mark.distributed
def test_demo_job_end_to_end(tmp_path):
    run_dir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "k15_megatron.cli", "demo", "examples/tiny.yaml", "parallel.tensor=2",
         "parallel.world_size=2", "optim.train_iters=4", "optim.lr=3e-3", f"run_dir={run_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [float(x) for x in re.findall(r"step \d+/4 loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0], proc.stdout
    for path in ("config.yaml", "hf_init/config.json", "ckpt_init/k15_meta.json",
                 "checkpoints/final/k15_meta.json", "hf_final/model.safetensors.index.json"):
        assert os.path.exists(run_dir / path), path
    assert "[5/5] transformers greedy completion" in proc.stdout
