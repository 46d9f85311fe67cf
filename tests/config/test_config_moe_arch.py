"""The mixture-of-experts part of resolve_model_arch, against config.json files written by
transformers (Qwen3-MoE, Qwen2-MoE), the hub spelling of Qwen3-MoE's keys, overrides, the
config.json written back for export, and the refusals."""

from __future__ import annotations

import json

import pytest
from tooling import save_config as save
from tooling import save_config_json as save_json
from transformers import Qwen2MoeConfig, Qwen3MoeConfig

from k15_megatron.config import ModelConfig, resolve_model_arch
from k15_megatron.config.hf_config import hf_config_dict
from k15_megatron.config.moe_arch import moe_layer_indices

SIZES = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=1024, rms_norm_eps=1e-6)


def edit(folder: str, **changes) -> str:
    path = f"{folder}/config.json"
    data = json.load(open(path))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    json.dump(data, open(path, "w"))
    return folder


def test_qwen3_moe_routing_and_layer_pattern(tmp_path):
    folder = save(tmp_path, Qwen3MoeConfig(**SIZES, head_dim=32, num_experts=8, num_experts_per_tok=2,
                                           moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[0, 2],
                                           router_aux_loss_coef=0.02))
    arch = resolve_model_arch(ModelConfig(hf_path=folder))
    assert (arch.family, arch.num_moe_experts, arch.moe_router_topk, arch.moe_ffn_hidden_size) == ("qwen3_moe", 8, 2, 48)
    assert arch.qk_layernorm and not arch.add_qkv_bias and arch.is_moe
    assert arch.moe_router_pre_softmax is False  # renormalised top-k = softmax over the top-k logits
    assert arch.moe_layer_freq == (0, 1, 0, 1) and moe_layer_indices(arch) == (1, 3)
    assert arch.moe_aux_loss_coeff == 0.02 and arch.moe_shared_expert_intermediate_size is None
    # The hub's config.json spells the expert count num_experts (transformers 5 writes num_local_experts).
    hub = edit(folder, num_local_experts=None, num_experts=8)
    assert resolve_model_arch(ModelConfig(hf_path=hub)) == arch
    # A config.json written for export reads back as the same architecture.
    exported = save_json(tmp_path, hf_config_dict(arch, json.load(open(f"{folder}/config.json"))), "exported")
    assert resolve_model_arch(ModelConfig(hf_path=exported)) == arch
    assert Qwen3MoeConfig.from_pretrained(exported).num_experts == 8


def test_qwen2_moe_shared_expert_and_defaults(tmp_path):
    folder = save(tmp_path, Qwen2MoeConfig(**SIZES, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=80))
    arch = resolve_model_arch(ModelConfig(hf_path=folder))
    assert arch.family == "qwen2_moe" and arch.add_qkv_bias and not arch.qk_layernorm
    assert arch.moe_router_pre_softmax is True  # norm_topk_prob false: softmax over all experts, kept as is
    assert arch.moe_shared_expert_intermediate_size == 80 and arch.moe_shared_expert_gate
    assert arch.moe_layer_freq is None and moe_layer_indices(arch) == (0, 1, 2, 3)
    # Without norm_topk_prob / router_aux_loss_coef, transformers' defaults apply.
    bare = edit(folder, norm_topk_prob=None, router_aux_loss_coef=None)
    assert resolve_model_arch(ModelConfig(hf_path=bare)).moe_aux_loss_coeff == 0.001
    override = resolve_model_arch(ModelConfig(hf_path=folder, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=1e-3))
    assert override.moe_aux_loss_coeff == 0.0 and override.moe_z_loss_coeff == 1e-3


@pytest.mark.parametrize("changes,message", [
    ({"shared_expert_intermediate_size": None}, "needs shared_expert_intermediate_size"),
    ({"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
    ({"num_experts_per_tok": 9}, "model.moe_router_topk=9 must be an integer in [1, model.num_moe_experts=4]"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step=0 must be a positive integer"),
    ({"mlp_only_layers": [0, 1, 2, 3]}, "at least one 1"),
])
def test_refusals_name_the_key(tmp_path, changes, message):
    folder = edit(save(tmp_path, Qwen2MoeConfig(**SIZES, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=32, shared_expert_intermediate_size=80)),
                  **changes)
    with pytest.raises(ValueError) as info:
        resolve_model_arch(ModelConfig(hf_path=folder))
    assert message in str(info.value)


def test_moe_keys_on_a_dense_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match="model.moe_router_topk set on a dense model"):
        resolve_model_arch(ModelConfig(family="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                                       num_attention_heads=4, vocab_size=100, max_position_embeddings=64,
                                       norm_epsilon=1e-6, moe_router_topk=2))
