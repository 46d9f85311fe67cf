"""Parameter counts of k15_megatron.plan.params against transformers' models and public figures."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import json

from k15_megatron.config import ModelConfig, resolve_model_arch
from k15_megatron.config.model_arch import ModelArch
from k15_megatron.plan.params import count_parameters, stage_layer_counts, stage_parameters

QWEN2_5_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                  max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False)
"""The public Qwen2.5-7B config.json (architecture keys)."""


def arch_of(hf: dict, folder) -> ModelArch:
    """The architecture the config loader resolves from ``hf`` written as config.json."""
    (folder / "config.json").write_text(json.dumps(hf))
    return resolve_model_arch(ModelConfig(hf_path=str(folder)))


TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-6)


@pytest.mark.parametrize("family,config_cls,model_cls,extra", [
    ("llama", LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": False}),
    ("llama", LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    ("qwen2", Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": False}),
    ("qwen3", Qwen3Config, Qwen3ForCausalLM, {"tie_word_embeddings": True, "head_dim": 24}),
])
def test_count_equals_transformers(family, config_cls, model_cls, extra, tmp_path):
    hf_config = config_cls(**TINY, **extra)
    with torch.device("meta"):
        model = model_cls(hf_config)
    expected = sum(p.numel() for p in model.parameters())
    assert count_parameters(arch_of(hf_config.to_dict(), tmp_path)) == expected


def test_qwen2_5_7b_has_its_published_count(tmp_path):
    assert count_parameters(arch_of(QWEN2_5_7B, tmp_path)) == 7_615_616_512


def test_stage_shards_add_up_to_the_padded_model(tmp_path):
    arch = arch_of(QWEN2_5_7B, tmp_path)
    padded = 152064  # already a multiple of 128
    whole = stage_parameters(arch, stage=0, pipeline=1, tensor=1, num_stage_layers=28, padded_vocab=padded)
    assert whole == count_parameters(arch)
    counts = stage_layer_counts(num_layers=28, pipeline=4)
    assert counts == [7, 7, 7, 7]
    stages = [stage_parameters(arch, stage=i, pipeline=4, tensor=1, num_stage_layers=n, padded_vocab=padded)
              for i, n in enumerate(counts)]
    assert sum(stages) == whole
    # TP splits every matrix: 4 ranks hold the matrices once and the norms 4 times.
    tp4 = stage_parameters(arch, stage=0, pipeline=1, tensor=4, num_stage_layers=28, padded_vocab=padded)
    norms = 28 * 2 * 3584 + 3584
    assert 4 * tp4 == whole + 3 * norms
    assert stage_layer_counts(num_layers=80, pipeline=4, first=18, last=18) == [18, 22, 22, 18]
