"""RoPE scaling in config.json and overrides: YaRN in both config.json layouts users have
(transformers 5 ``rope_parameters`` / the older top-level ``rope_scaling`` with ``type``), the
refusals (unsupported types, bad values) made by config validation before any process starts,
and the config.json written back (export, engine folder) carrying the same scaling."""

from __future__ import annotations

import json

import pytest
import torch
from tooling import save_config as save
from tooling import save_config_json as save_json
from transformers import AutoConfig, LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from k15_megatron.config import ConfigError, ModelConfig, load_config, resolve_model_arch
from k15_megatron.config.hf_config import hf_config_dict

SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6)
QWEN25_YARN = {"factor": 4.0, "original_max_position_embeddings": 32768}


def old_layout(tmp_path, rope_scaling: dict, name="old", **extra) -> str:
    """A Qwen2.5 config.json as users edit it for YaRN (top-level rope_theta/rope_scaling)."""
    data = {"model_type": "qwen2", **SIZES, "max_position_embeddings": 131072, "rope_theta": 1e6,
            "rope_scaling": rope_scaling, **extra}
    return save_json(tmp_path, data, name)


def test_yarn_reads_the_same_from_both_layouts(tmp_path):
    new = save(tmp_path, Qwen2Config(**SIZES, max_position_embeddings=131072, rope_theta=1e6,
                                     rope_scaling={"rope_type": "yarn", **QWEN25_YARN}), "new")
    assert "rope_parameters" in json.loads((tmp_path / "new" / "config.json").read_text())
    old = old_layout(tmp_path, {"type": "yarn", **QWEN25_YARN})
    # both keys: transformers reads rope_scaling, so does k15
    both = old_layout(tmp_path, {"type": "yarn", **QWEN25_YARN}, "both",
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    expected = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    for path in (new, old, both):
        arch = resolve_model_arch(ModelConfig(hf_path=path))
        assert arch.rope_scaling == expected and arch.rope_theta == 1e6, path
        assert AutoConfig.from_pretrained(path).rope_parameters["rope_type"] == "yarn"


def test_yarn_keeps_the_optional_keys_given_and_overrides_enable_it(tmp_path):
    given = {"type": "yarn", **QWEN25_YARN, "beta_fast": 16, "beta_slow": 2, "mscale": 1,
             "mscale_all_dim": 0.5, "truncate": False, "attention_factor": 1.2}
    arch = resolve_model_arch(ModelConfig(hf_path=old_layout(tmp_path, given)))
    assert arch.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                                 "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                                 "truncate": False, "attention_factor": 1.2}
    plain = save(tmp_path, Qwen2Config(**SIZES, max_position_embeddings=131072), "plain")
    on = resolve_model_arch(ModelConfig(hf_path=plain, rope_scaling={"rope_type": "yarn", **QWEN25_YARN}))
    assert on.rope_scaling == {"rope_type": "yarn", **QWEN25_YARN}


@pytest.mark.parametrize("rope,needle", [
    ({"type": "longrope", "short_factor": [1.0], "long_factor": [2.0], "original_max_position_embeddings": 4096},
     "rope type 'longrope' is not supported (supported: default, llama3, yarn)"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope type 'dynamic' is not supported"),
    ({"rope_type": "linear", "factor": 2.0}, "rope type 'linear' is not supported"),
    ({"type": "yarn", "factor": 4.0}, "yarn rope scaling lacks original_max_position_embeddings"),
    ({"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 32768}, "factor=0.5 must be a number >= 1"),
    ({"type": "yarn", **QWEN25_YARN, "truncate": "yes"}, "truncate='yes' must be true or false"),
    ({"type": "yarn", **QWEN25_YARN, "beta_fast": 1, "beta_slow": 4}, "beta_fast=1 is below beta_slow=4"),
    ({"type": "yarn", **QWEN25_YARN, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768},
     "max_position_embeddings in {path}/config.json = 131072 exceeds what its yarn rope scaling covers, "
     "factor x original_max_position_embeddings = 2 x 32768 = 65536"),
])
def test_unsupported_or_bad_rope_scaling_is_refused_by_validation_naming_the_file(tmp_path, rope, needle):
    path = old_layout(tmp_path, rope)
    with pytest.raises(ConfigError) as info:  # what every k15 command runs before starting processes
        load_config(None, [f"model.hf_path={path}", "data.seq_length=1024"], te_available=lambda: False,
                    environ={})
    assert needle.format(path=path) in str(info.value)
    assert f"{path}/config.json" in str(info.value)


def _rope_init(config_dict: dict, model_type: str):
    config = AutoConfig.for_model(model_type, **config_dict)
    return ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu")


@pytest.mark.parametrize("family,config", [
    ("qwen2", Qwen2Config(**SIZES, max_position_embeddings=256, rope_theta=1e4,
                          rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                        "beta_fast": 24.0, "truncate": False})),
    ("llama", LlamaConfig(**SIZES, max_position_embeddings=1024, rope_theta=5e5,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
])
def test_written_config_carries_the_same_rope_scaling(tmp_path, family, config):
    """hf_config_dict (export, engine folder) writes rope_scaling and rope_parameters; they
    resolve to the same arch and give transformers the same frequencies and cos/sin factor."""
    original = save(tmp_path, config, "original")
    arch = resolve_model_arch(ModelConfig(hf_path=original))
    base = json.loads((tmp_path / "original" / "config.json").read_text())
    written = hf_config_dict(arch, base)
    assert written["rope_scaling"] == arch.rope_scaling
    assert resolve_model_arch(ModelConfig(hf_path=save_json(tmp_path, written, "written"))) == arch
    model_type = written.pop("model_type")
    inv_freq, factor = _rope_init(written, model_type)
    ref_inv_freq, ref_factor = _rope_init({k: v for k, v in base.items() if k != "model_type"}, model_type)
    assert torch.equal(inv_freq, ref_inv_freq) and factor == ref_factor
    assert factor != 1.0 if family == "qwen2" else factor == 1.0
