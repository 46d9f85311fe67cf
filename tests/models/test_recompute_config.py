"""``parallel.recompute`` reaches Megatron-Core's TransformerConfig (its effect on memory is
measured in tests/plan/test_plan_activations.py: full recompute keeps < 0.7x the activations)."""

from __future__ import annotations

import pytest

from k15_megatron.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig, load_config, resolve_model_arch
from k15_megatron.models.gpt import recompute_config_fields, transformer_config

ARCH = resolve_model_arch(ModelConfig(family="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                                      num_attention_heads=4, num_query_groups=2, vocab_size=256,
                                      max_position_embeddings=64, norm_epsilon=1e-6))


@pytest.mark.parametrize("mode,granularity,method,num_layers,modules", [
    ("none", None, None, None, None),
    ("selective", "selective", None, None, ["core_attn"]),
    ("full", "full", "uniform", 1, None),
])
def test_recompute_reaches_transformer_config(mode, granularity, method, num_layers, modules):
    config = transformer_config(ARCH, parallel_cfg=ParallelConfig(recompute=mode),
                                precision_cfg=PrecisionConfig(dtype="fp32"))
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == \
        (granularity, method, num_layers)
    if modules is not None:
        assert config.recompute_modules == modules


def test_unknown_recompute_is_refused():
    with pytest.raises(ValueError, match="parallel.recompute='layer'"):
        recompute_config_fields("layer")
    with pytest.raises(ConfigError, match="parallel.recompute='layer' is not a valid choice"):
        load_config(None, ["parallel.recompute=layer", "model.family=qwen2", "model.num_layers=2",
                           "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
                           "model.vocab_size=256", "model.max_position_embeddings=64", "model.norm_epsilon=1e-6"],
                    environ={})
