"""`k15 dpo` from the command line on a tiny model (one process).

One run of 4 steps on grouped sampled responses and pair records (the pairs of
k15_megatron.data.pairs), checked for: exit status 0; every step's metrics (train/loss,
rewards/chosen|rejected|margin|accuracy, train/grad_norm, train/lr); a first loss of log 2 with
zero rewards (the policy IS the reference before the first update: the job's reference
log-probs are the starting model's); a loss that falls; the final checkpoint holding the
reference log-probs of every pair. A resume takes the reference from the checkpoint
(test_resume_keeps_the_checkpoints_reference: the job's own function, without a second start);
the resume itself is k15 sft's path (run_ckpt), tested with it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tooling import REPO_ROOT

RECORDS = [
    {"prompt": "Compute: 2+3", "responses": ["\\boxed{5}", "2+3=5, check 5-3=2, so \\boxed{5}", "\\boxed{6}"],
     "correct": [True, True, False]},
    {"prompt": "Compute: 4+4", "responses": ["4+4=9 \\boxed{9}", "\\boxed{8}"], "correct": [False, True]},
    {"prompt": "Compute: 7-1", "chosen": "\\boxed{6}", "rejected": "7-1=6, verify 6+1=7: \\boxed{6}"},
    {"prompt": "Compute: 9-4", "chosen": "\\boxed{5}", "rejected": "\\boxed{4}"},
]
"""Five pairs: line 1 gives two ("\\boxed{5}" vs the long correct one and vs "\\boxed{6}"), the others one each."""


def _k15(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "K15_STRICT_DEVICE": "1"}
    return subprocess.run([sys.executable, "-m", "k15_megatron.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "train/loss" in r]


@pytest.mark.distributed
def test_k15_dpo_trains_and_logs(tiny_hf_dirs, tmp_path):
    data = tmp_path / "groups.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    run_dir = tmp_path / "run"
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("name: dpo\n")
    overrides = [f"model.hf_path={tiny_hf_dirs['qwen2']}", f"run_dir={run_dir}", f"data.train_path={data}",
                 "precision.dtype=fp32", "data.seq_length=128", "data.global_batch_size=4", "data.micro_batch_size=2",
                 "optim.lr=3e-3", "dpo.beta=0.5", "parallel.world_size=1", "checkpoint.save_interval=2"]
    proc = _k15("dpo", str(recipe), *overrides, "optim.train_iters=4")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    steps = _metrics(run_dir)
    keys = {"train/loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
            "train/grad_norm", "train/lr"}
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4] and all(keys <= set(r) for r in steps), steps
    first = steps[0]
    # float32 sums of ~30 log-probs, packed differently in the reference pass: equal to ~1e-6
    assert abs(first["train/loss"] - math.log(2)) < 1e-5 and abs(first["rewards/margin"]) < 1e-4, first
    losses = [r["train/loss"] for r in steps]
    assert losses[-1] < losses[0] - 0.05 and steps[-1]["rewards/accuracy"] > 0.5, steps
    state = torch.load(run_dir / "checkpoints" / "iter_0000004" / "run_state.pt", weights_only=False)
    assert state["reference_logprobs"].shape == (5, 2) and bool((state["reference_logprobs"] < 0).all())



def test_resume_keeps_the_checkpoints_reference():
    """On a resume the job trains against the reference stored in the checkpoint (the starting
    model's), never one recomputed from the resumed weights; a data file whose pair count differs
    is refused naming data.train_path."""
    import types

    from k15_megatron.jobs.dpo import _reference

    stored = -torch.rand(3, 2, dtype=torch.float64)
    trainer = types.SimpleNamespace(cfg=types.SimpleNamespace(data=types.SimpleNamespace(train_path="p.jsonl")))
    assert _reference(trainer, [0, 1, 2], {"reference_logprobs": stored}) is stored
    with pytest.raises(ValueError, match=r"cover 3 pairs and data.train_path=p.jsonl gives 2"):
        _reference(trainer, [0, 1], {"reference_logprobs": stored})
