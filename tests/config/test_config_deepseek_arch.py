"""DeepSeek-V3 (model_type deepseek_v3) in resolve_model_arch: config.json files written by
transformers, the config.json written back for export, the parameter count against
transformers' model, and the refusals (each naming its key)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tooling import save_config as save
from tooling import save_config_json as save_json
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from k15_megatron.config import ModelConfig, ParallelConfig, resolve_model_arch
from k15_megatron.config.hf_config import hf_config_dict
from k15_megatron.config.moe_arch import moe_layer_indices
from k15_megatron.config.validate import model_split_errors
from k15_megatron.models.gpt import mla_config_fields
from k15_megatron.plan.params import count_parameters
from k15_megatron.plan.rollout import kv_bytes_per_token

# Published DeepSeek-V3 routing and attention shapes, scaled down (8 experts in 4 groups, top 4
# from the 2 best groups, latent 64, no MTP weights).
SIZES = dict(hidden_size=64, intermediate_size=176, moe_intermediate_size=24, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, vocab_size=300, max_position_embeddings=1024,
             rms_norm_eps=1e-6, q_lora_rank=48, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
             n_shared_experts=2, routed_scaling_factor=2.5, first_k_dense_replace=2, norm_topk_prob=True,
             topk_method="noaux_tc", scoring_func="sigmoid", rope_scaling=None)


def _folder(tmp_path, name="hf", **changes) -> str:
    return save(tmp_path, DeepseekV3Config(**{**SIZES, **changes}), name)


def test_deepseek_v3_fields_and_export(tmp_path):
    folder = _folder(tmp_path, num_nextn_predict_layers=1)  # MTP weights are ignored, as transformers does
    arch = resolve_model_arch(ModelConfig(hf_path=folder))
    assert (arch.family, arch.num_moe_experts, arch.moe_router_topk, arch.moe_ffn_hidden_size) == ("deepseek_v3", 8, 4, 24)
    assert arch.is_mla and arch.is_moe and not arch.add_qkv_bias
    assert (arch.q_lora_rank, arch.kv_lora_rank, arch.qk_head_dim, arch.qk_pos_emb_head_dim, arch.v_head_dim) == \
        (48, 64, 16, 8, 16)
    assert arch.kv_channels == 24  # the query/key width per head (config.json's head_dim is the rotary width)
    assert (arch.moe_router_score_function, arch.moe_router_enable_expert_bias) == ("sigmoid", True)
    assert (arch.moe_router_num_groups, arch.moe_router_group_topk, arch.moe_router_topk_scaling_factor) == (4, 2, 2.5)
    assert arch.moe_shared_expert_intermediate_size == 48 and not arch.moe_shared_expert_gate
    assert arch.moe_layer_freq == (0, 0, 1, 1) and moe_layer_indices(arch) == (2, 3)
    assert arch.moe_aux_loss_coeff == 0.0 and arch.rope_scaling is None
    exported = save_json(tmp_path, hf_config_dict(arch, json.load(open(f"{folder}/config.json"))), "exported")
    assert resolve_model_arch(ModelConfig(hf_path=exported)) == arch
    config = DeepseekV3Config.from_pretrained(exported)
    assert (config.n_routed_experts, config.first_k_dense_replace, config.n_shared_experts, config.q_lora_rank) == \
        (8, 2, 2, 48)
    assert config.num_nextn_predict_layers == 0 and config.topk_method == "noaux_tc"
    # DeepSeek-V3's config.json has no per-layer pattern: dense layers must come first.
    with pytest.raises(ValueError, match=r"model.moe_layer_freq=\[1, 0, 1, 1\] cannot be written"):
        hf_config_dict(dataclasses.replace(arch, moe_layer_freq=(1, 0, 1, 1)))


@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_parameter_count_equals_transformers(q_lora_rank, tmp_path):
    folder = _folder(tmp_path, q_lora_rank=q_lora_rank)
    arch = resolve_model_arch(ModelConfig(hf_path=folder))
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_pretrained(folder))
    assert count_parameters(arch) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("changes,message", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                        "mscale": 1.0, "mscale_all_dim": 1.0}), "rope type 'yarn' is not supported"),
    (dict(norm_topk_prob=False), "norm_topk_prob=false is not supported"),
    (dict(topk_method="greedy"), "topk_method='greedy' is not supported"),
    (dict(scoring_func="softmax"), "scoring_func='softmax' is not supported"),
    (dict(rope_interleave=False), "rope_interleave=False is not supported"),
    (dict(num_experts_per_tok=2), "num_experts_per_tok=2 with topk_group=2"),
    (dict(n_group=3), "n_group=3 must divide n_routed_experts=8"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace=4 must be an integer in [0, num_hidden_layers=4)"),
    (dict(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}),
     "quantization_config (quant_method 'fp8') is not supported"),
])
def test_unsupported_settings_are_refused_naming_the_key(changes, message, tmp_path):
    folder = _folder(tmp_path, **changes)
    with pytest.raises(ValueError, match="config.json") as info:
        resolve_model_arch(ModelConfig(hf_path=folder))
    assert message in str(info.value)


def test_a_missing_latent_rank_is_named(tmp_path):
    folder = _folder(tmp_path)
    data = json.load(open(f"{folder}/config.json"))
    data.pop("kv_lora_rank")
    json.dump(data, open(f"{folder}/config.json", "w"))
    with pytest.raises(ValueError, match="needs kv_lora_rank as a positive integer"):
        resolve_model_arch(ModelConfig(hf_path=folder))


def test_multi_latent_attention_refuses_tensor_parallelism(tmp_path):
    arch = resolve_model_arch(ModelConfig(hf_path=_folder(tmp_path)))
    assert mla_config_fields(arch, parallel_cfg=ParallelConfig(expert=2))["kv_lora_rank"] == 64
    with pytest.raises(ValueError, match="parallel.tensor=2: model family 'deepseek_v3'"):
        mla_config_fields(arch, parallel_cfg=ParallelConfig(tensor=2))
    assert mla_config_fields(dataclasses.replace(arch, kv_lora_rank=None), parallel_cfg=ParallelConfig(tensor=2)) == {}


def test_layouts_with_tensor_or_context_parallelism_are_refused_before_start(tmp_path):
    arch = resolve_model_arch(ModelConfig(hf_path=_folder(tmp_path)))
    assert model_split_errors(arch, ParallelConfig(pipeline=2, expert=2), 128) == []
    errors = model_split_errors(arch, ParallelConfig(tensor=2, context=2, expert=2), 128)
    assert errors == [f"parallel.{key}=2: model family 'deepseek_v3' (multi-latent attention) supports "
                      f"parallel.{key}=1 only; split it with parallel.expert and parallel.pipeline"
                      for key in ("tensor", "context")]


def test_vllm_kv_cache_per_token_is_the_latent(tmp_path):
    arch = resolve_model_arch(ModelConfig(hf_path=_folder(tmp_path)))
    # 4 layers x (kv_lora_rank 64 + qk_rope_head_dim 8) x 2 bytes, the same on every TP rank
    assert kv_bytes_per_token(arch, tensor_parallel=2, dtype_bytes=2) == 4 * 72 * 2
    full = dataclasses.replace(arch, num_layers=61, kv_lora_rank=512, qk_pos_emb_head_dim=64)
    assert kv_bytes_per_token(full, tensor_parallel=8, dtype_bytes=2) == 70272  # DeepSeek-V3 in bf16
