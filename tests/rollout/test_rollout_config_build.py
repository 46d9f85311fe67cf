"""rollout config rules and the engine build arguments (process layout, CPU specifics); no vLLM."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from k15_megatron.config.rollout import RolloutConfig
from k15_megatron.config.validate import section_field_errors
from k15_megatron.rollout.build import engine_layout, llm_kwargs
from k15_megatron.rollout.repeat_stop import REPEAT_STOP_PROCESSOR


def test_defaults_are_valid_and_omegaconf_structured():
    assert section_field_errors(RolloutConfig(), "rollout.") == []
    merged = OmegaConf.merge(OmegaConf.structured(RolloutConfig),
                             {"tensor_parallel_size": 2, "logprobs_mode": "processed_logprobs"})
    cfg = OmegaConf.to_object(merged)
    assert cfg.tensor_parallel_size == 2 and cfg.logprobs_mode == "processed_logprobs"
    with pytest.raises(Exception):
        OmegaConf.merge(OmegaConf.structured(RolloutConfig), {"no_such_key": 1})


@pytest.mark.parametrize("field,value,key", [
    ("top_p", 0.0, "rollout.top_p"),
    ("top_p", 1.5, "rollout.top_p"),
    ("top_p", 0.9, "rollout.top_p"),
    ("top_k", 50, "rollout.top_k"),
    ("gpu_memory_utilization", 0.0, "rollout.gpu_memory_utilization"),
    ("cpu_kv_cache_gib", 0.0, "rollout.cpu_kv_cache_gib"),
    ("max_model_len", 1, "rollout.max_model_len"),
    ("logprobs_mode", "raw_logits", "rollout.logprobs_mode"),
    ("dtype", "int8", "rollout.dtype"),
    ("tensor_parallel_size", 0, "rollout.tensor_parallel_size"),
    ("repeat_check_interval", 0, "rollout.repeat_check_interval"),
    ("temperature", -0.1, "rollout.temperature"),
])
def test_each_invalid_value_is_reported_with_its_key(field, value, key):
    cfg = dataclasses.replace(RolloutConfig(), **{field: value})
    errors = section_field_errors(cfg, "rollout.")
    assert len(errors) == 1 and errors[0].startswith(key), errors


def test_layout_splits_world_into_replicas_of_tensor_parallel_ranks():
    cfg = RolloutConfig(tensor_parallel_size=2)
    layouts = [engine_layout(cfg, world_size=4, rank=r) for r in range(4)]
    assert [l.data_parallel_size for l in layouts] == [2] * 4
    assert [l.data_parallel_rank for l in layouts] == [0, 0, 1, 1]
    assert all(l.spmd for l in layouts)
    assert not engine_layout(RolloutConfig(), world_size=1, rank=0).spmd
    with pytest.raises(ValueError, match="rollout.tensor_parallel_size=2 must divide"):
        engine_layout(cfg, world_size=3, rank=0)


def test_llm_kwargs_cpu_single_process():
    cfg = RolloutConfig(cpu_kv_cache_gib=1.5, max_model_len=512, max_response_tokens=256)
    kw = llm_kwargs(cfg, model_path="/m", seed=7, on_cpu=True,
                    layout=engine_layout(cfg, world_size=1, rank=0))
    assert kw["dtype"] == "float32" and kw["enforce_eager"] is True
    assert kw["kv_cache_memory_bytes"] == int(1.5 * 2**30)
    assert kw["seed"] == 7 and kw["max_model_len"] == 512
    assert kw["logits_processors"] == [REPEAT_STOP_PROCESSOR]
    assert kw["logprobs_mode"] == "raw_logprobs"
    assert "distributed_executor_backend" not in kw and "data_parallel_size" not in kw


def test_llm_kwargs_spmd_layouts_and_gpu_defaults():
    tp2 = RolloutConfig(tensor_parallel_size=2)
    kw = llm_kwargs(tp2, model_path="/m", seed=1, on_cpu=False,
                    layout=engine_layout(tp2, world_size=2, rank=1))
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["tensor_parallel_size"] == 2 and "data_parallel_size" not in kw
    assert kw["dtype"] == "auto" and kw["enforce_eager"] is False
    assert "kv_cache_memory_bytes" not in kw and kw["enable_sleep_mode"] is True

    tp1 = RolloutConfig(tensor_parallel_size=1)
    seeds = []
    for rank in range(2):
        kw = llm_kwargs(tp1, model_path="/m", seed=1, on_cpu=True,
                        layout=engine_layout(tp1, world_size=2, rank=rank))
        assert kw["distributed_executor_backend"] == "external_launcher"
        assert kw["tensor_parallel_size"] == 1 and kw["data_parallel_size"] == 2
        seeds.append(kw["seed"])
    assert seeds[0] != seeds[1]  # replicas never share a random stream
