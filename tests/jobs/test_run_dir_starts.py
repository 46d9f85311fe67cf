"""A run directory records each start, and a resume never silently changes what is trained.

One real `k15 sft` run (tiny model, one process) of 2 steps, then starts of the same run dir:

* the same command again: "run already complete at iteration 2; nothing to do", exit 0, and
  neither the checkpoints, config.yaml nor starts.jsonl change;
* a changed optim.lr: refused before anything starts, naming the key (old -> new), and let
  through (the change listed) with checkpoint.allow_config_change=true;
* optim.train_iters 2 -> 3 with the schedule length left to follow it: refused (the
  checkpoint's LR scheduler decays over 2 steps), naming optim.lr_decay_iters=2 as the fix;
* optim.train_iters=3, optim.lr_decay_iters=2 (the same schedule) and logging.log_interval=2:
  resumed from iter 2 with the difference printed in one line and recorded in starts.jsonl;
  each checkpoint keeps the config it was written with, and run_dir/config.yaml is the newest's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from tooling import REPO_ROOT


def _tree_state(folder) -> dict:
    """path -> (size, mtime_ns) of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def _starts(run_dir) -> list[dict]:
    with open(run_dir / "starts.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _config(path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.mark.slow
def test_starts_are_recorded_and_config_changes_on_resume_are_checked(tmp_path, capsys):
    from k15_megatron.checkpoint.run_dir import plan_start
    from k15_megatron.config import load_config
    from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits
    from k15_megatron.data.jsonl import write_jsonl
    from k15_megatron.jobs.sft import main

    write_jsonl(str(tmp_path / "sft.jsonl"), generate_splits(ArithmeticTaskConfig(num_sft=16, num_train=0,
                                                                                  num_eval=0))["sft"])
    run_dir = tmp_path / "run"
    base = ["examples/tiny.yaml", f"run_dir={run_dir}", f"data.train_path={tmp_path / 'sft.jsonl'}",
            "data.seq_length=128", "data.global_batch_size=2", "optim.train_iters=2"]

    def start(*extra):  # a real start in its own process, as a user runs it
        return subprocess.run([sys.executable, "-m", "k15_megatron.cli", "sft", *base, *extra], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=600)

    proc = start()
    assert proc.returncode == 0, proc.stderr[-3000:]
    [first] = _starts(run_dir)
    assert first["resumed_from"] is None and first["changes"] == [] and first["start"] == 1
    assert "optim.train_iters=2" in first["command"] and first["overrides"] == base[1:]
    assert _config(run_dir / first["config"])["optim"]["train_iters"] == 2
    checkpoint = run_dir / "checkpoints" / "iter_0000002"
    assert _config(checkpoint / "config.yaml") == _config(run_dir / "config.yaml")
    before = _tree_state(run_dir)

    # The same command again: complete, nothing written (in-process: nothing would start anyway).
    os.chdir(REPO_ROOT)
    assert main(base) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith("run already complete at iteration 2 "
                                    f"({checkpoint}, optim.train_iters=2); nothing to do"), out
    assert out.out.count("\n") == 1, out.out
    assert _tree_state(run_dir) == before, "a complete run's directory was touched"

    assert main(base + ["optim.lr=0.002"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr 0.0001 -> 0.002" in err and "checkpoint.allow_config_change=true" in err, err
    assert "another run_dir" in err
    assert main(base + ["optim.train_iters=3"]) == 2
    err = capsys.readouterr().err
    assert "decays over 2 optimizer steps" in err and "optim.train_iters 2 -> 3" in err, err
    assert "set optim.lr_decay_iters=2" in err.lower(), err
    assert _tree_state(run_dir) == before, "a refused start wrote into the run directory"
    # checkpoint.allow_config_change=true lets the same change through, with the difference kept
    plan = plan_start(load_config(base[0], base[1:] + ["optim.lr=0.002", "checkpoint.allow_config_change=true"]),
                      job="sft")
    assert plan.resume_from == str(checkpoint)
    assert [c[0] for c in plan.changes] == ["optim.lr", "checkpoint.allow_config_change"]

    proc = start("optim.train_iters=3", "optim.lr_decay_iters=2", "logging.log_interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [text for text in proc.stdout.splitlines() if "changed config" in text]
    assert "optim.train_iters 2 -> 3" in line and "optim.lr_decay_iters None -> 2" in line, line
    assert "logging.log_interval 1 -> 2" in line and str(checkpoint) in line, line
    first_again, second = _starts(run_dir)
    assert first_again == first
    assert second["start"] == 2 and second["resumed_from"] == str(checkpoint) and second["resumed_iteration"] == 2
    assert {c["key"]: (c["old"], c["new"]) for c in second["changes"]} == {
        "optim.train_iters": (2, 3), "optim.lr_decay_iters": (None, 2), "logging.log_interval": (1, 2)}
    assert _config(checkpoint / "config.yaml")["optim"]["train_iters"] == 2, "a checkpoint's config was rewritten"
    newest = run_dir / "checkpoints" / "iter_0000003"
    assert _config(newest / "config.yaml")["optim"]["train_iters"] == 3
    assert _config(run_dir / "config.yaml") == _config(newest / "config.yaml")
