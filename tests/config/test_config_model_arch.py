"""resolve_model_arch against real config.json files written by transformers (Llama 3 with
llama3 RoPE scaling, Qwen2 with QKV bias and tied embeddings, Qwen3 with explicit head_dim and
QK-norm), the transformers-4 layout, overrides, and every refusal."""

from __future__ import annotations


import pytest
from tooling import save_config as save
from tooling import save_config_json as save_json
from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from k15_megatron.config import ModelArch, ModelConfig, read_hf_config, resolve_model_arch

SIZES = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=1024,
             rms_norm_eps=1e-5)
# transformers adds rope_theta into the dict it is given: always pass a copy.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}


def test_llama3_with_rope_scaling(tmp_path):
    path = save(tmp_path, LlamaConfig(**SIZES, rope_theta=500000.0,
                                      rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False))
    assert "rope_parameters" in read_hf_config(path)  # transformers 5 layout
    arch = resolve_model_arch(ModelConfig(hf_path=path))
    assert arch == ModelArch(
        family="llama", num_layers=3, hidden_size=64, ffn_hidden_size=176,
        num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=300,
        max_position_embeddings=1024, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
        norm_epsilon=1e-5, tie_word_embeddings=False, add_qkv_bias=False, qk_layernorm=False)


def test_qwen2_bias_and_tied_embeddings(tmp_path):
    path = save(tmp_path, Qwen2Config(**SIZES, rope_theta=1e6, tie_word_embeddings=True))
    arch = resolve_model_arch(ModelConfig(hf_path=path))
    assert (arch.family, arch.add_qkv_bias, arch.qk_layernorm) == ("qwen2", True, False)
    assert arch.tie_word_embeddings is True and arch.rope_theta == 1e6 and arch.rope_scaling is None
    assert arch.kv_channels == 16  # no head_dim in a Qwen2 config.json: hidden / heads


def test_qwen3_explicit_head_dim_and_qk_norm(tmp_path):
    path = save(tmp_path, Qwen3Config(**SIZES, head_dim=32))
    arch = resolve_model_arch(ModelConfig(hf_path=path))
    assert (arch.family, arch.kv_channels, arch.qk_layernorm, arch.add_qkv_bias) == \
        ("qwen3", 32, True, False)
    assert arch.num_query_groups == 2 and arch.rope_theta == 10000.0


def test_transformers4_layout_and_defaults(tmp_path):
    # Hand-written in the older layout: top-level rope_theta / rope_scaling with "type",
    # no num_key_value_heads / head_dim / tie_word_embeddings (their HF defaults apply).
    path = save_json(tmp_path, {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 8, "vocab_size": 300,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 500000,
        "rope_scaling": {"type": "llama3", "factor": 32, "low_freq_factor": 1,
                         "high_freq_factor": 4, "original_max_position_embeddings": 512}})
    arch = resolve_model_arch(ModelConfig(hf_path=path))
    assert (arch.num_query_groups, arch.kv_channels, arch.tie_word_embeddings) == (8, 8, False)
    assert arch.rope_theta == 500000.0 and isinstance(arch.rope_theta, float)
    assert arch.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 512}


def test_overrides_win_and_derived_defaults_follow_them(tmp_path):
    path = save(tmp_path, Qwen2Config(**SIZES))
    arch = resolve_model_arch(ModelConfig(hf_path=path, num_layers=1, hidden_size=128,
                                          num_query_groups=4, rope_theta=1e5,
                                          tie_word_embeddings=True, add_qkv_bias=False))
    assert (arch.num_layers, arch.hidden_size, arch.num_query_groups) == (1, 128, 4)
    assert arch.kv_channels == 32  # recomputed from the overridden hidden size
    assert (arch.rope_theta, arch.tie_word_embeddings, arch.add_qkv_bias) == (1e5, True, False)
    assert arch.ffn_hidden_size == 176  # untouched fields still come from config.json


def test_rope_scaling_override_can_switch_scaling_off_or_on(tmp_path):
    scaled = save(tmp_path, LlamaConfig(**SIZES, rope_scaling=dict(LLAMA3_ROPE)), "scaled")
    off = resolve_model_arch(ModelConfig(hf_path=scaled, rope_scaling={"rope_type": "default"}))
    assert off.rope_scaling is None
    plain = save(tmp_path, LlamaConfig(**SIZES), "plain")
    on = resolve_model_arch(ModelConfig(hf_path=plain, rope_scaling=dict(LLAMA3_ROPE)))
    assert on.rope_scaling == LLAMA3_ROPE


def test_no_hf_path_needs_the_core_fields():
    with pytest.raises(ValueError) as info:
        resolve_model_arch(ModelConfig(family="llama", hidden_size=64))
    msg = str(info.value)
    assert "model.hf_path is null" in msg
    for key in ("model.num_layers", "model.ffn_hidden_size", "model.num_attention_heads",
                "model.vocab_size", "model.max_position_embeddings", "model.norm_epsilon"):
        assert key in msg
    assert "model.family" not in msg and "model.hidden_size" not in msg
    arch = resolve_model_arch(ModelConfig(
        family="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        vocab_size=100, max_position_embeddings=256, norm_epsilon=1e-6))
    assert (arch.num_query_groups, arch.kv_channels, arch.qk_layernorm) == (4, 16, True)


@pytest.mark.parametrize("make,needle", [
    (lambda: GPT2Config(n_layer=2, n_embd=64, n_head=4), "model_type 'gpt2' is not supported"),
    (lambda: LlamaConfig(**SIZES, attention_bias=True), "attention_bias=true"),
    (lambda: Qwen3Config(**SIZES, attention_bias=True), "o_proj"),
    (lambda: LlamaConfig(**SIZES, hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda: LlamaConfig(**SIZES, mlp_bias=True), "mlp_bias=true"),
    (lambda: Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=128,
                         max_window_layers=1), "sliding-window"),
    (lambda: Qwen2Config(**SIZES, rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
     "rope type 'dynamic' is not supported"),
])
def test_unsupported_architectures_are_refused(tmp_path, make, needle):
    path = save(tmp_path, make())
    with pytest.raises(ValueError) as info:
        resolve_model_arch(ModelConfig(hf_path=path))
    assert needle in str(info.value)
    assert f"{path}/config.json" in str(info.value)  # names the file


def test_unsupported_model_type_lists_supported_families(tmp_path):
    path = save(tmp_path, GPT2Config(n_layer=2, n_embd=64, n_head=4))
    with pytest.raises(ValueError, match=r"supported: llama, qwen2, qwen3"):
        resolve_model_arch(ModelConfig(hf_path=path))


def test_inconsistent_inputs(tmp_path):
    path = save(tmp_path, Qwen2Config(**SIZES))
    with pytest.raises(ValueError, match="model.family='llama' contradicts model_type 'qwen2'"):
        resolve_model_arch(ModelConfig(hf_path=path, family="llama"))
    with pytest.raises(ValueError, match="model.num_attention_heads=4 is not divisible by "
                                         "model.num_query_groups=3"):
        resolve_model_arch(ModelConfig(hf_path=path, num_query_groups=3))
    with pytest.raises(ValueError, match="model.hidden_size=66 is not divisible"):
        resolve_model_arch(ModelConfig(hf_path=path, hidden_size=66))
    with pytest.raises(ValueError, match="lacks 'rope_type'"):
        resolve_model_arch(ModelConfig(hf_path=path, rope_scaling={"factor": 8.0}))
    with pytest.raises(ValueError, match="lacks high_freq_factor"):
        resolve_model_arch(ModelConfig(hf_path=path, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 256}))
    with pytest.raises(ValueError, match="no config.json there"):
        resolve_model_arch(ModelConfig(hf_path=str(tmp_path / "nowhere")))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk/config.json: not valid JSON"):
        resolve_model_arch(ModelConfig(hf_path=str(tmp_path / "junk")))
