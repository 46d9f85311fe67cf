"""The rl: config section: defaults valid, every check names its dotted key, OmegaConf-ready."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from k15_megatron.config.rl import RLConfig


def test_defaults_are_valid_and_match_the_report_where_it_is_specific():
    cfg = RLConfig()
    assert cfg.validate() == []
    assert cfg.log_z == "mean" and cfg.normalize == "none" and cfg.reset_optimizer is True
    assert cfg.sampling.strategy == "prioritized" and cfg.logprob_check.tis_enabled is False


@pytest.mark.parametrize("dotted,value", [
    ("tau", 0.0), ("group_size", 0), ("log_z", "median"), ("normalize", "tokens"),
    ("logprob_chunk_tokens", 0), ("length_penalty.weight", -1.0),
    ("length_penalty.warmup_iterations", -1), ("sampling.strategy", "random"),
    ("sampling.success_tracking", "max"), ("sampling.ema_decay", 1.0),
    ("sampling.unseen_success_rate", 1.5), ("sampling.priority_floor", -0.1),
    ("replay.segment_token_budget", 0), ("replay.max_segments", 0),
    ("replay.segment_loss_policy", "oldest"), ("replay.max_segment_age", -1),
    ("repeat.max_period", 0), ("repeat.min_repeats", 1), ("repeat.penalty", -1.0),
    ("logprob_check.tis_level", "batch"), ("logprob_check.tis_clip", 0.0),
])
def test_each_invalid_value_is_reported_with_its_key(dotted, value):
    cfg = RLConfig()
    *parents, leaf = dotted.split(".")
    target = cfg
    for p in parents:
        target = getattr(target, p)
    setattr(target, leaf, value)
    errors = cfg.validate()
    assert len(errors) == 1 and errors[0].startswith(f"rl.{dotted}:"), errors
    assert cfg.config_errors("train.rl")[0].startswith(f"train.rl.{dotted}:")


def test_omegaconf_structured_merge_and_unknown_keys():
    schema = OmegaConf.structured(RLConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create(
        {"tau": 0.05, "replay": {"segment_loss_policy": "latest"}}))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, RLConfig) and cfg.tau == 0.05
    assert cfg.replay.segment_loss_policy == "latest" and cfg.validate() == []
    with pytest.raises(Exception, match="not_a_key"):
        OmegaConf.merge(schema, OmegaConf.create({"not_a_key": 1}))
