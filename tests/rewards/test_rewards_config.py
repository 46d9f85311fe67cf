"""The rewards config section: defaults are valid, every check names its dotted key, reward
specs parse, and the dataclasses work as OmegaConf structured configs."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from k15_megatron.config.rewards import (CodeRewardConfig, MathRewardConfig, RewardModelConfig,
                                         RewardsConfig, TestGenConfig, parse_reward_spec)


def test_defaults_are_valid_and_match_the_paper():
    cfg = RewardsConfig()
    assert cfg.validate() == []
    testgen = TestGenConfig()
    assert testgen.validate() == []
    assert (testgen.num_cases, testgen.num_solutions, testgen.case_min_agree,
            testgen.problem_min_pass) == (50, 10, 7, 9)


def test_testgen_is_the_tool_settings_not_a_job_config_key():
    """``rewards.testgen`` had no reader in any job: it is gone from the job config, and
    the data tool checks its own settings."""
    from k15_megatron.config.loader import load_config

    with pytest.raises(ValueError, match="rewards.testgen"):
        load_config(None, ["rewards.testgen.num_cases=5"], check=False)
    assert TestGenConfig(case_min_agree=11).validate()[0].startswith("testgen.case_min_agree:")
    assert TestGenConfig(problem_min_pass=0).validate()[0].startswith("testgen.problem_min_pass:")


@pytest.mark.parametrize("cfg,key", [
    (RewardsConfig(math=MathRewardConfig(time_limit_s=0)), "rewards.math.time_limit_s"),
    (RewardsConfig(math=MathRewardConfig(max_nesting_depth=0)), "rewards.math.max_nesting_depth"),
    (RewardsConfig(math=MathRewardConfig(answer_pattern="Answer: .*")),
     "rewards.math.answer_pattern"),
    (RewardsConfig(math=MathRewardConfig(answer_pattern="(")), "rewards.math.answer_pattern"),
    (RewardsConfig(code=CodeRewardConfig(time_limit_s=-1)), "rewards.code.time_limit_s"),
    (RewardsConfig(code=CodeRewardConfig(memory_mb=8)), "rewards.code.memory_mb"),
    (RewardsConfig(code=CodeRewardConfig(max_processes=0)), "rewards.code.max_processes"),
    (RewardsConfig(code=CodeRewardConfig(sandbox_uid_base=0)), "rewards.code.sandbox_uid_base"),
    (RewardsConfig(code=CodeRewardConfig(num_workers=8, num_sandbox_uids=4)),
     "rewards.code.num_sandbox_uids"),
    (RewardsConfig(code=CodeRewardConfig(limits_backend="cgroups")),
     "rewards.code.limits_backend"),
    (RewardsConfig(code=CodeRewardConfig(sandbox_readonly_paths=["data"])),
     "rewards.code.sandbox_readonly_paths"),
    (RewardsConfig(code=CodeRewardConfig(cgroup_parent="k15")), "rewards.code.cgroup_parent"),
    (RewardsConfig(code=CodeRewardConfig(max_tmp_mb=0)), "rewards.code.max_tmp_mb"),
    (RewardsConfig(rm=RewardModelConfig(backend="tgi")), "rewards.rm.backend"),
    (RewardsConfig(rm=RewardModelConfig(backend="openai", model="m"), default="math,rm"),
     "rewards.rm.base_url"),
    (RewardsConfig(rm=RewardModelConfig(base_url="http://h/v1"), sources={"s": "rm=0.5,math"}),
     "rewards.rm.model"),
    (RewardsConfig(rm=RewardModelConfig(prompt_template="Judge {question}")),
     "rewards.rm.prompt_template"),
    (RewardsConfig(default="maths"), "rewards.default"),
    (RewardsConfig(sources={"gsm8k": "math=x"}), "rewards.sources.gsm8k"),
])
def test_each_problem_names_its_dotted_key(cfg, key):
    errors = cfg.validate()
    assert len(errors) == 1 and errors[0].startswith(key + ":"), errors


def test_generic_validator_hook_uses_the_given_prefix():
    errors = RewardsConfig(default="maths").config_errors("train.rewards")
    assert errors and errors[0].startswith("train.rewards.default:")


def test_reward_specs():
    assert parse_reward_spec("math") == {"math": 1.0}
    assert parse_reward_spec(" math=0.8 , rm=0.2 ") == {"math": 0.8, "rm": 0.2}
    assert parse_reward_spec("pkg.mod:fn=2,code") == {"pkg.mod:fn": 2.0, "code": 1.0}
    for bad, why in [("", "empty item"), ("math,", "empty item"), ("math=a", "not a number"),
                     ("math=-1", "weight >= 0"), ("math,math", "twice"), ("math=0", "total")]:
        with pytest.raises(ValueError, match=why):
            parse_reward_spec(bad)


def test_omegaconf_structured_merge():
    schema = OmegaConf.structured(RewardsConfig)
    override = OmegaConf.create({"code": {"time_limit_s": 2.5, "cpp_flags": ["-O0"]},
                                 "sources": {"gsm8k": "math=0.9,rm=0.1"},
                                 "rm": {"base_url": "http://127.0.0.1:8000/v1", "model": "j"}})
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, override))
    assert isinstance(cfg, RewardsConfig) and cfg.code.time_limit_s == 2.5
    assert cfg.code.cpp_flags == ["-O0"] and cfg.sources == {"gsm8k": "math=0.9,rm=0.1"}
    assert cfg.validate() == []
    with pytest.raises(Exception, match="no_such_key"):
        OmegaConf.merge(schema, {"math": {"no_such_key": 1}})
