"""FP8 reaches Megatron-Core's TransformerConfig as Megatron-LM's --fp8-* flags set it.

Built through the real :func:`k15_megatron.models.gpt.transformer_config` on the installed
megatron-core (TransformerConfig itself needs no Transformer Engine). Whether TE then runs FP8
GEMMs can only be seen on a GPU with TE (tools/gpu_check.py's ``fp8`` check).
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest

from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
from k15_megatron.models.gpt import FP8_FIELDS, fp8_config_fields, transformer_config
from k15_megatron.parallel.device import HAVE_TE

ARCH = resolve_model_arch(ModelConfig(
    family="qwen2", num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
    num_query_groups=2, vocab_size=128, max_position_embeddings=256, norm_epsilon=1e-6))


def _config(**precision):
    return transformer_config(ARCH, parallel_cfg=ParallelConfig(),
                              precision_cfg=PrecisionConfig(dtype="bf16", **precision))


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_each_recipe_sets_the_transformer_config_fields(fmt, recipe):
    cfg = _config(fp8=fmt, fp8_recipe=recipe, fp8_margin=2, fp8_amax_history_len=16,
                  fp8_amax_compute_algo="most_recent", fp8_wgrad=False, fp8_param_gather=True)
    got = {f: getattr(cfg, f) for f in ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len",
                                         "fp8_amax_compute_algo", "fp8_wgrad", "fp8_param")}
    assert got == {"fp8": fmt, "fp8_recipe": recipe, "fp8_margin": 2, "fp8_amax_history_len": 16,
                   "fp8_amax_compute_algo": "most_recent", "fp8_wgrad": False, "fp8_param": True}
    assert cfg.bf16 and cfg.params_dtype.is_floating_point


def test_schema_defaults_reach_the_config():
    cfg = _config(fp8="hybrid")
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_margin, cfg.fp8_amax_history_len,
            cfg.fp8_amax_compute_algo, cfg.fp8_wgrad, cfg.fp8_param) == \
        ("hybrid", "delayed", 0, 1024, "max", True, False)


def test_fp8_off_leaves_megatron_defaults():
    cfg = _config(fp8_recipe="mxfp8", fp8_param_gather=False, fp8_margin=3)
    assert cfg.fp8 is None and cfg.fp8_param is False and cfg.fp8_margin == 0
    assert fp8_config_fields(PrecisionConfig(fp8_recipe="mxfp8")) == {}


def test_every_field_exists_in_the_installed_transformer_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(FP8_FIELDS.values()) <= names
    assert set(FP8_FIELDS) <= {f.name for f in dataclasses.fields(PrecisionConfig)}


def test_a_release_without_a_field_is_an_error_naming_the_key():
    available = frozenset(FP8_FIELDS.values()) - {"fp8_param"}
    with pytest.raises(ValueError, match=r"precision\.fp8_param_gather \(TransformerConfig\.fp8_param\)"):
        fp8_config_fields(PrecisionConfig(fp8="e4m3"), available=available)


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed: the TE spec is used")
def test_without_te_megatron_fp8_is_a_silent_no_op_so_the_spec_refuses():
    # Why the refusal exists: without TE Megatron-Core's FP8 context does nothing.
    from megatron.core.fp8_utils import get_fp8_context

    assert isinstance(get_fp8_context(_config(fp8="hybrid")), contextlib.nullcontext)
    from k15_megatron.models.specs import gpt_layer_spec

    with pytest.raises(ValueError, match=r"precision\.fp8='hybrid' needs the Transformer Engine layer spec"):
        gpt_layer_spec(qk_layernorm=False, fp8="hybrid")
    assert gpt_layer_spec(qk_layernorm=False, fp8=None) is not None
