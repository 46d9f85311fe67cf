"""Parameter counts of k15_megatron.plan.params against transformers' models and public figures."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import json

from k15_megatron.config import ModelConfig, resolve_model_arch
from k15_megatron.config.model_arch import ModelArch
from k15_megatron.plan.params import count_parameters, stage_layer_counts, stage_layer_ranges, stage_parameters

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
    whole = stage_parameters(arch, stage=0, pipeline=1, tensor=1, layers=range(28), padded_vocab=padded).total
    assert whole == count_parameters(arch)
    counts = stage_layer_counts(num_layers=28, pipeline=4)
    assert counts == [7, 7, 7, 7]
    stages = [stage_parameters(arch, stage=i, pipeline=4, tensor=1, layers=layers, padded_vocab=padded).total
              for i, layers in enumerate(stage_layer_ranges(counts))]
    assert sum(stages) == whole
    # TP splits every matrix: 4 ranks hold the matrices once and the norms 4 times.
    tp4 = stage_parameters(arch, stage=0, pipeline=1, tensor=4, layers=range(28), padded_vocab=padded).total
    norms = 28 * 2 * 3584 + 3584
    assert 4 * tp4 == whole + 3 * norms
    assert stage_layer_counts(num_layers=80, pipeline=4, first=18, last=18) == [18, 22, 22, 18]


def _tiny_moe(family: str, **extra):
    """A tiny transformers MoE config: 8 experts (top 2), layer 1 dense (mlp_only_layers)."""
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40, mlp_only_layers=[1])
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**TINY, **moe, head_dim=24, norm_topk_prob=True, **extra)
    return Qwen2MoeConfig(**TINY, **moe, shared_expert_intermediate_size=72, **extra)


@pytest.mark.parametrize("family,tie", [("qwen3_moe", False), ("qwen3_moe", True), ("qwen2_moe", False)])
def test_moe_count_equals_transformers(family, tie, tmp_path):
    from transformers import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

    hf_config = _tiny_moe(family, tie_word_embeddings=tie)
    model_cls = Qwen3MoeForCausalLM if family == "qwen3_moe" else Qwen2MoeForCausalLM
    with torch.device("meta"):
        model = model_cls(hf_config)
    expected = sum(p.numel() for p in model.parameters())
    arch = arch_of(hf_config.to_dict(), tmp_path)
    assert arch.moe_layer_freq == (1, 0, 1)
    assert count_parameters(arch) == expected
    # The planner's split: routed experts apart from the rest, one rank's whole model at TP=EP=1.
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    whole = stage_parameters(arch, stage=0, pipeline=1, tensor=1, layers=range(3), padded_vocab=300)
    assert (whole.dense, whole.experts) == (expected - experts, experts)


def test_qwen3_30b_a3b_has_its_published_count_and_shards(tmp_path):
    from public_configs import QWEN3_30B_A3B

    arch = arch_of(QWEN3_30B_A3B, tmp_path)
    assert count_parameters(arch) == 30_532_122_624
    experts = 48 * 128 * 3 * 2048 * 768
    # TP 4 x EP 4: 32 experts per rank, each split over TP; the rest as the dense model (TP 4).
    shard = stage_parameters(arch, stage=0, pipeline=1, tensor=4, layers=range(48), padded_vocab=151936, expert=4)
    assert shard.experts * 16 == experts
    whole = stage_parameters(arch, stage=0, pipeline=1, tensor=1, layers=range(48), padded_vocab=151936)
    replicated = 48 * (2 * 2048 + 2 * 128 + 128 * 2048) + 2048  # norms, q/k norms, routers, final norm
    assert 4 * shard.dense == whole.dense + 3 * replicated
    # Two pipeline stages hold the layers once between them.
    stages = [stage_parameters(arch, stage=i, pipeline=2, tensor=1, layers=layers, padded_vocab=151936, expert=1)
              for i, layers in enumerate(stage_layer_ranges([24, 24]))]
    assert sum(s.total for s in stages) == count_parameters(arch)
