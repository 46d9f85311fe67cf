"""Dense families beside Llama 3 / Qwen2 / Qwen3: Mistral from config.json (and its refusals),
DeepSeek-R1-Distill checkpoints (config.json of their Qwen2 or Llama base) resolving as that base,
the Mistral config.json written for export, and an unsupported family refused by ``k15 sft``
before anything starts."""

from __future__ import annotations

import os

import pytest
from tooling import REPO_ROOT
from tooling import save_config_json as save_json
from transformers import AutoConfig, MistralConfig

from k15_megatron.config import ModelArch, ModelConfig, resolve_model_arch
from k15_megatron.config.hf_config import hf_config_dict

SIZES = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=1024, rms_norm_eps=1e-5)

# config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B as published (transformers 4 layout):
# sliding_window is set but unused (use_sliding_window false), untied embeddings, rope_theta 10000.
R1_DISTILL_QWEN = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.44.0", "use_cache": True, "use_mrope": False,
    "use_sliding_window": False, "vocab_size": 151936,
}
# config.json of deepseek-ai/DeepSeek-R1-Distill-Llama-8B as published (Llama 3.1 base).
R1_DISTILL_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "vocab_size": 128256,
}


def test_mistral_resolves_like_llama_with_an_explicit_head_dim(tmp_path):
    folder = tmp_path / "mistral"
    MistralConfig(**SIZES, head_dim=32, rope_theta=1e6, sliding_window=None).save_pretrained(str(folder))
    arch = resolve_model_arch(ModelConfig(hf_path=str(folder)))
    assert arch == ModelArch(
        family="mistral", num_layers=3, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
        num_query_groups=2, kv_channels=32, vocab_size=300, max_position_embeddings=1024, rope_theta=1e6,
        rope_scaling=None, norm_epsilon=1e-5, tie_word_embeddings=False, add_qkv_bias=False, qk_layernorm=False)


def test_mistral_export_config_reads_back_as_the_same_mistral(tmp_path):
    arch = ModelArch(family="mistral", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                     num_query_groups=2, kv_channels=32, vocab_size=100, max_position_embeddings=512,
                     rope_theta=1e6, rope_scaling=None, norm_epsilon=1e-5, tie_word_embeddings=False,
                     add_qkv_bias=False, qk_layernorm=False)
    config = hf_config_dict(arch)  # no original config.json: nothing to inherit sliding_window from
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] is None
    folder = save_json(tmp_path, config)
    assert resolve_model_arch(ModelConfig(hf_path=folder)) == arch
    loaded = AutoConfig.from_pretrained(folder)  # transformers reads it as the same model
    assert type(loaded).__name__ == "MistralConfig" and loaded.sliding_window is None and loaded.head_dim == 32


@pytest.mark.parametrize("extra,needle", [
    ({"sliding_window": 4096}, "sliding_window=4096 (model_type 'mistral')"),
    ({"sliding_window": None, "layer_types": ["sliding_attention"] * 3}, "sliding-window attention"),
    ({"sliding_window": None, "llama_4_scaling": {"beta": 0.1, "original_max_position_embeddings": 64}},
     "llama_4_scaling is not supported"),
])
def test_mistral_features_the_builders_lack_are_refused_naming_the_file(tmp_path, extra, needle):
    data = {**MistralConfig(**SIZES).to_dict(), **extra}  # MistralConfig's default sliding_window is 4096
    folder = save_json(tmp_path, data)
    with pytest.raises(ValueError) as info:
        resolve_model_arch(ModelConfig(hf_path=folder))
    assert needle in str(info.value) and os.path.join(folder, "config.json") in str(info.value)


def test_deepseek_r1_distill_qwen_resolves_as_qwen2(tmp_path):
    folder = save_json(tmp_path, R1_DISTILL_QWEN)
    arch = resolve_model_arch(ModelConfig(hf_path=folder))
    assert (arch.family, arch.add_qkv_bias, arch.qk_layernorm) == ("qwen2", True, False)
    assert arch.tie_word_embeddings is False
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads) == (28, 1536, 12)
    assert (arch.num_query_groups, arch.kv_channels) == (2, 128)
    assert arch.rope_theta == 10000.0 and arch.rope_scaling is None and arch.vocab_size == 151936
    # transformers agrees that no layer uses the sliding window although sliding_window is set
    assert set(AutoConfig.from_pretrained(folder).layer_types) == {"full_attention"}


def test_deepseek_r1_distill_llama_resolves_as_llama3(tmp_path):
    arch = resolve_model_arch(ModelConfig(hf_path=save_json(tmp_path, R1_DISTILL_LLAMA)))
    assert (arch.family, arch.add_qkv_bias, arch.num_query_groups, arch.kv_channels) == ("llama", False, 8, 128)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


def test_architectures_and_name_do_not_decide_the_family(tmp_path):
    """Only model_type does: a renamed class list (or none) resolves to the same architecture."""
    reference = resolve_model_arch(ModelConfig(hf_path=save_json(tmp_path, R1_DISTILL_QWEN, "a")))
    odd = {**R1_DISTILL_QWEN, "architectures": ["LlamaForCausalLM"], "_name_or_path": "DeepSeek-R1-Distill-Llama"}
    no_classes = {k: v for k, v in R1_DISTILL_QWEN.items() if k != "architectures"}
    for name, data in (("b", odd), ("c", no_classes)):
        assert resolve_model_arch(ModelConfig(hf_path=save_json(tmp_path, data, name))) == reference


@pytest.mark.parametrize("model_type", ["gemma2", "phi3"])
def test_k15_sft_refuses_an_unsupported_family_before_anything_starts(tmp_path, capsys, model_type):
    from k15_megatron.jobs import sft

    folder = save_json(tmp_path, {**R1_DISTILL_QWEN, "model_type": model_type})
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "1+1", "response": "2"}\n')
    run_dir = tmp_path / "run"
    nulls = ["family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
             "vocab_size", "max_position_embeddings", "norm_epsilon"]
    status = sft.main([os.path.join(REPO_ROOT, "examples", "tiny.yaml"), *[f"model.{k}=null" for k in nulls],
                       f"model.hf_path={folder}", f"data.train_path={train}", f"run_dir={run_dir}",
                       "parallel.world_size=2", "precision.dtype=fp32"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{os.path.join(folder, 'config.json')}: model_type {model_type!r} is not supported" in err
    assert "mistral" in err  # the supported families are listed
    assert not run_dir.exists()
