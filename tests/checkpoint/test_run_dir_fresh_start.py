"""A fresh start (checkpoint.resume=never) never writes over a run's existing checkpoints."""

from __future__ import annotations

import pytest
from tooling import REPO_ROOT

from k15_megatron.checkpoint.run_dir import plan_start
from k15_megatron.config import ConfigError, load_config


def test_resume_never_refuses_a_save_dir_holding_checkpoints(tmp_path):
    overrides = [f"run_dir={tmp_path}", "checkpoint.resume=never"]
    plan = plan_start(load_config(f"{REPO_ROOT}/examples/tiny.yaml", overrides), job="sft")  # nothing there yet
    assert plan.resume_from is None
    (tmp_path / "checkpoints" / "iter_0000002").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        plan_start(load_config(f"{REPO_ROOT}/examples/tiny.yaml", overrides), job="sft")
    message = str(info.value)
    assert "checkpoint.resume=never" in message and "iter_0000002" in message and "another run_dir" in message


def test_memory_only_keys_may_change_on_resume_the_layout_may_not():
    from k15_megatron.checkpoint.run_dir import _resumable

    assert all(_resumable(k) for k in ("parallel.recompute", "parallel.cp_comm_type", "data.micro_batch_tokens"))
    assert not any(_resumable(k) for k in ("parallel.context", "parallel.tensor", "rl.tau"))
