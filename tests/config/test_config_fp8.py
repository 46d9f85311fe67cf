"""FP8 validation: refused without Transformer Engine, on a GPU without the recipe's FP8 kind,
with a TE too old for the recipe, and for FP8 parameters without the distributed optimizer;
each message names the key. The platform is injected (this machine has neither TE nor a GPU);
the real probe's refusal is in test_config_validate.py."""

from __future__ import annotations

import pytest

from k15_megatron.config import ConfigError, load_config, validate
from k15_megatron.config.fp8 import RECIPE_NEEDS, Fp8Platform, probe_fp8_platform

BASE = ["model.family=qwen2", "model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=256",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=128",
        "model.max_position_embeddings=256", "model.norm_epsilon=1e-6", "data.seq_length=256"]
H100 = Fp8Platform(te_version="2.8.0", compute_capability=(9, 0))


def errors(*overrides, platform=H100, te=True):
    cfg = load_config(None, BASE + list(overrides), check=False, environ={})
    try:
        validate(cfg, te_available=lambda: te, fp8_platform=lambda: platform, environ={})
    except ConfigError as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("recipe", sorted(RECIPE_NEEDS))
def test_recipe_needs_its_compute_capability(recipe):
    need, _ = RECIPE_NEEDS[recipe]
    at = Fp8Platform(te_version="2.8.0", compute_capability=need)
    below = Fp8Platform(te_version="2.8.0", compute_capability=(need[0], need[1] - 1) if need[1] else (need[0] - 1, 0))
    assert errors("precision.fp8=hybrid", f"precision.fp8_recipe={recipe}", platform=at) == ""
    msg = errors("precision.fp8=hybrid", f"precision.fp8_recipe={recipe}", platform=below)
    assert f"precision.fp8_recipe='{recipe}' needs a GPU of compute capability >= {need[0]}.{need[1]}" in msg


def test_ampere_is_refused_and_mxfp8_names_blackwell_capability():
    assert "compute capability >= 8.9; this one has 8.0" in errors(
        "precision.fp8=e4m3", platform=Fp8Platform(te_version="2.8.0", compute_capability=(8, 0)))
    msg = errors("precision.fp8=e4m3", "precision.fp8_recipe=mxfp8", platform=H100)
    assert ">= 10.0; this one has 9.0" in msg and "precision.fp8_recipe=delayed" in msg


def test_no_gpu_with_te_installed_is_refused():
    msg = errors("precision.fp8=hybrid", platform=Fp8Platform(te_version="2.8.0", compute_capability=None))
    assert "precision.fp8='hybrid'" in msg and "this process sees none" in msg


@pytest.mark.parametrize("recipe,old", [("tensorwise", "2.1.0"), ("blockwise", "2.2.1"), ("mxfp8", "2.0.0")])
def test_recipe_needs_its_te_version(recipe, old):
    b200 = Fp8Platform(te_version=old, compute_capability=(10, 0))
    msg = errors("precision.fp8=hybrid", f"precision.fp8_recipe={recipe}", platform=b200)
    need = RECIPE_NEEDS[recipe][1]
    assert f"needs Transformer Engine >= {need[0]}.{need[1]}; installed: {old}" in msg
    new = Fp8Platform(te_version=f"{need[0]}.{need[1]}.0.dev0+abc", compute_capability=(10, 0))
    assert errors("precision.fp8=hybrid", f"precision.fp8_recipe={recipe}", platform=new) == ""


def test_without_te_only_the_te_rule_speaks():
    msg = errors("precision.fp8=hybrid", "precision.fp8_recipe=mxfp8", te=False, platform=None)
    assert "precision.fp8='hybrid' needs Transformer Engine" in msg and "compute capability" not in msg


def test_fp8_param_gather_rules():
    assert "precision.fp8_param_gather=true needs precision.fp8" in errors("precision.fp8_param_gather=true")
    msg = errors("precision.fp8=hybrid", "precision.fp8_param_gather=true")
    assert "precision.fp8_param_gather=true needs optim.use_distributed_optimizer=true" in msg
    assert errors("precision.fp8=hybrid", "precision.fp8_param_gather=true",
                  "optim.use_distributed_optimizer=true") == ""


def test_real_probe_without_te_reports_nothing_to_probe():
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    assert probe_fp8_platform() is None
