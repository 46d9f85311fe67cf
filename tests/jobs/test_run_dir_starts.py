"""A run directory records each start, and a resume never silently changes what is trained.

One real `k15 sft` run (tiny model, one process) of 2 steps, then starts of the same run dir:

* the same command again: "run already complete at iteration 2; nothing to do", exit 0, and
  neither the checkpoints, config.yaml nor starts.jsonl change;
* a changed seed: refused before anything starts, naming the key (old -> new) and the ways out;
* a changed optim.lr: refused even with checkpoint.allow_config_change=true (the checkpoint's
  optimizer settings would silently win), pointing to a new run with model.init_from;
* a longer run with a decaying learning rate (a copy of the checkpoint, said to be trained with
  a cosine schedule): refused, naming optim.lr_decay_iters=2 as the fix, which is accepted;
* optim.train_iters=3 (constant learning rate), logging.tensorboard=false and, let through by
  checkpoint.allow_config_change=true, seed=7: resumed from iter 2 with the difference printed in
  one line and recorded in starts.jsonl; each checkpoint keeps the config it was written with,
  and run_dir/config.yaml is the newest's.
"""

from __future__ import annotations

import json
import os
import shutil
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


def _decaying_schedule_is_not_stretched(checkpoint, other, base) -> None:
    """A copy of the real checkpoint, said to be trained with a cosine schedule over 2 steps:
    4 steps would change the remaining rates (refused, naming the fix), unless
    optim.lr_decay_iters keeps the decay at 2 steps."""
    from k15_megatron.checkpoint.run_dir import plan_start
    from k15_megatron.config import ConfigError, load_config, to_yaml

    overrides = [f"run_dir={other}", *base[2:], "optim.lr_decay_style=cosine"]
    copy = other / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    (copy / "config.yaml").write_text(to_yaml(load_config(base[0], overrides)))
    with pytest.raises(ConfigError) as info:
        plan_start(load_config(base[0], overrides + ["optim.train_iters=4"]), job="sft")
    assert "learning-rate decay length" in str(info.value) and "2 -> 4" in str(info.value)
    assert "optim.lr_decay_iters=2 keeps the checkpoint's schedule" in str(info.value)
    with pytest.raises(ConfigError):  # the checkpoint's schedule would win: no override lets it through
        plan_start(load_config(base[0], overrides + ["optim.train_iters=4", "checkpoint.allow_config_change=true"]),
                   job="sft")
    plan = plan_start(load_config(base[0], overrides + ["optim.train_iters=4", "optim.lr_decay_iters=2"]), job="sft")
    assert plan.resume_from == str(copy) and [c[0] for c in plan.changes] == ["optim.lr_decay_iters",
                                                                              "optim.train_iters"]


@pytest.mark.slow
def test_starts_are_recorded_and_config_changes_on_resume_are_checked(tmp_path, capsys):
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

    assert main(base + ["seed=7"]) == 2  # changes the data order: what is trained
    err = capsys.readouterr().err
    assert "seed 1234 -> 7" in err and "checkpoint.allow_config_change=true" in err and "another run_dir" in err
    # the optimizer's settings come back from the checkpoint: refused even with the override
    assert main(base + ["optim.lr=0.002", "checkpoint.allow_config_change=true"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr 0.0001 -> 0.002" in err and f"model.init_from={checkpoint.parent}" in err, err
    assert _tree_state(run_dir) == before, "a refused start wrote into the run directory"

    _decaying_schedule_is_not_stretched(checkpoint, tmp_path / "cosine", base)

    # A longer run (constant learning rate), an observation key, and a seed let through by the override
    proc = start("optim.train_iters=3", "logging.tensorboard=false", "seed=7", "checkpoint.allow_config_change=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [text for text in proc.stdout.splitlines() if "changed config" in text]
    assert "seed 1234 -> 7" in line and "optim.train_iters 2 -> 3" in line, line
    assert "logging.tensorboard True -> False" in line and str(checkpoint) in line, line
    first_again, second = _starts(run_dir)
    assert first_again == first
    assert second["start"] == 2 and second["resumed_from"] == str(checkpoint) and second["resumed_iteration"] == 2
    assert {c["key"]: (c["old"], c["new"]) for c in second["changes"]} == {
        "seed": (1234, 7), "optim.train_iters": (2, 3), "checkpoint.allow_config_change": (False, True),
        "logging.tensorboard": (True, False)}
    assert _config(checkpoint / "config.yaml")["optim"]["train_iters"] == 2, "a checkpoint's config was rewritten"
    newest = run_dir / "checkpoints" / "iter_0000003"
    assert _config(newest / "config.yaml")["optim"]["train_iters"] == 3
    assert _config(run_dir / "config.yaml") == _config(newest / "config.yaml")
