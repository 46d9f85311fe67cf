"""Configurations `k15 rl` cannot train with are refused before any process starts, each by a
message naming the keys: a no-op truncated importance sampling, tempered rollouts, groups of
one, and a learning-rate schedule longer or shorter than the run's optimizer steps."""

from __future__ import annotations

import os

import pytest
from tooling import REPO_ROOT

from k15_megatron.config import ConfigError, load_config
from k15_megatron.config.validate import rl_job_errors, rl_optimizer_steps

TINY = os.path.join(REPO_ROOT, "examples", "tiny.yaml")


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, list(overrides), environ={})
    return str(info.value)


def test_truncated_importance_sampling_against_behaviour_reference_is_refused():
    msg = refused("rl.logprob_check.tis_enabled=true", "rl.reference=behaviour")
    assert "rl.logprob_check.tis_enabled" in msg and "rl.reference=behaviour" in msg
    load_config(TINY, ["rl.logprob_check.tis_enabled=true", "rl.reference=recompute"], environ={})
    load_config(TINY, ["rl.logprob_check.tis_enabled=false", "rl.reference=behaviour"], environ={})


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_rollout_temperature_other_than_one_is_refused(temperature):
    msg = refused(f"rollout.temperature={temperature}")
    assert f"rollout.temperature={temperature}" in msg and "eval.temperature" in msg


def test_eval_temperature_stays_free():
    cfg = load_config(TINY, ["eval.temperature=0.6", "eval.num_samples=4", "eval.ks=[1,4]"], environ={})
    assert cfg.eval.temperature == 0.6 and cfg.rollout.temperature == 1.0


def test_group_of_one_is_refused():
    msg = refused("rl.group_size=1")
    assert "rl.group_size" in msg and "every advantage is 0" in msg
    assert load_config(TINY, ["rl.group_size=2"], environ={}).rl.group_size == 2


def test_rl_schedule_length_is_the_rl_optimizer_step_count():
    cfg = load_config(TINY, ["rl.iterations=6", "rl.updates_per_iteration=3", "rl.prompts_per_iteration=6",
                             "optim.train_iters=1000",
                             "optim.lr_decay_style=cosine", "optim.lr_warmup_iters=20"], environ={})
    assert rl_optimizer_steps(cfg.rl) == 18
    [msg] = rl_job_errors(cfg)
    assert "optim.lr_warmup_iters=20" in msg and "rl.iterations x rl.updates_per_iteration = 18" in msg
    cfg.optim.lr_warmup_iters = 17
    assert rl_job_errors(cfg) == []


def test_k15_rl_refuses_a_schedule_error_before_starting_processes(capsys):
    from k15_megatron.jobs.rl import main

    status = main([TINY, "rl.iterations=2", "optim.lr_decay_style=linear", "optim.lr_warmup_iters=5"])
    err = capsys.readouterr().err
    assert status == 2
    assert "optim.lr_warmup_iters=5" in err and "rl.iterations x rl.updates_per_iteration = 2" in err


def test_curriculum_threshold_is_on_the_normalised_scale():
    assert "rl.sampling.curriculum_hard_threshold" in refused("rl.sampling.curriculum_hard_threshold=3")
