"""Qwen2-VL's architecture from config.json (k15_megatron/config/vision_arch.py): both config.json
layouts give the same language model and vision tower; bad vision settings and the jobs'
missing vision-language support are refused before any process starts, naming the key."""

from __future__ import annotations

import json

import pytest

from k15_megatron.config import ModelConfig, resolve_model_arch
from k15_megatron.config.model_arch import resolve_vision_arch

VISION = {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 128,
          "hidden_act": "quick_gelu", "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2}
TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 106, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": False}
IDS = {"image_token_id": 104, "vision_start_token_id": 102, "video_token_id": 105}


def _write(tmp_path, config: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _transformers5(**vision):
    text = {**TEXT, "model_type": "qwen2_vl_text",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}}
    return {"model_type": "qwen2_vl", "text_config": text, "vision_config": {**VISION, **vision}, **IDS}


def _hub_layout():
    return {"model_type": "qwen2_vl", **TEXT, "rope_theta": 1e6, **IDS, "vision_config": VISION,
            "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}


def test_both_config_layouts_resolve_to_the_same_architecture(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    archs = [(resolve_model_arch(ModelConfig(hf_path=d)), resolve_vision_arch(ModelConfig(hf_path=d)))
             for d in (_write(new, _transformers5()), _write(old, _hub_layout()))]
    assert archs[0] == archs[1]
    arch, vision = archs[0]
    assert (arch.family, arch.add_qkv_bias, arch.rope_scaling, arch.rope_theta) == ("qwen2_vl", True, None, 1e6)
    assert (vision.mrope_section, vision.ffn_hidden_size, vision.image_token_id) == ((4, 6, 6), 128, 104)


def test_qwen2_5_vl_reads_its_own_vision_keys(tmp_path):
    vision = {"depth": 4, "hidden_size": 64, "intermediate_size": 96, "num_heads": 2, "out_hidden_size": 128,
              "hidden_act": "silu", "window_size": 112, "fullatt_block_indexes": [1, 3]}
    config = {**_transformers5(), "model_type": "qwen2_5_vl", "vision_config": vision}
    path = _write(tmp_path, config)
    arch, got = resolve_model_arch(ModelConfig(hf_path=path)), resolve_vision_arch(ModelConfig(hf_path=path))
    assert (arch.family, arch.add_qkv_bias) == ("qwen2_5_vl", True)
    assert (got.family, got.embed_dim, got.ffn_hidden_size, got.out_hidden_size, got.window_size,
            got.fullatt_block_indexes) == ("qwen2_5_vl", 64, 96, 128, 112, (1, 3))
    config["vision_config"] = {**vision, "fullatt_block_indexes": [4]}
    with pytest.raises(ValueError, match=r"vision_config.fullatt_block_indexes=\[4\]"):
        resolve_vision_arch(ModelConfig(hf_path=_write(tmp_path, config)))


@pytest.mark.parametrize("vision, key", [
    ({"hidden_act": "silu"}, "vision_config.hidden_act"),
    ({"num_heads": 3}, "vision_config.embed_dim"),
])
def test_unsupported_vision_settings_are_refused_naming_the_key(tmp_path, vision, key):
    path = _write(tmp_path, _transformers5(**vision))
    with pytest.raises(ValueError, match=key):
        resolve_vision_arch(ModelConfig(hf_path=path))


def test_mrope_sections_must_fill_half_the_head(tmp_path):
    config = _transformers5()
    config["text_config"]["rope_parameters"]["mrope_section"] = [4, 6, 4]
    with pytest.raises(ValueError, match=r"mrope_section=\[4, 6, 4\] sums to 14.*needs 16"):
        resolve_vision_arch(ModelConfig(hf_path=_write(tmp_path, config)))


def test_only_the_jobs_that_run_images_accept_a_vision_language_model(tmp_path):
    from k15_megatron.config.errors import ConfigError
    from k15_megatron.config.loader import load_config
    from k15_megatron.config.validate import vision_job_errors
    from k15_megatron.jobs.preflight import JOBS

    cfg = load_config(None, [f"model.hf_path={_write(tmp_path, _transformers5())}"])  # every job: accepted
    assert {"sft", "rl", "eval"} <= {job for job, inputs in JOBS.items() if inputs.images}
    (error,) = vision_job_errors(cfg.model, job="textonly")  # a job whose entry would not say images
    assert error.startswith("model.family='qwen2_vl'") and "k15 textonly does not run vision-language" in error
    broken = _transformers5(num_heads=3)
    (tmp_path / "broken").mkdir()
    with pytest.raises(ConfigError, match="vision_config.embed_dim"):  # the vision config is still validated
        load_config(None, [f"model.hf_path={_write(tmp_path / 'broken', broken)}"])
