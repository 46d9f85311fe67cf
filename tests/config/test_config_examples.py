"""Every examples/*.yaml loads and validates; recipes hold overrides only (no value equal to
its schema default, so defaults are never written twice)."""

from __future__ import annotations

import glob
import json
import os

import pytest
from omegaconf import OmegaConf
from transformers import Qwen2Config

from k15_megatron.config import ConfigError, load_config, resolve_model_arch
from k15_megatron.config.schema import ExperimentConfig
from public_configs import QWEN3_30B_A3B

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml")))
# Overrides a recipe needs to validate on this machine (its cluster world size).
CLUSTER_OVERRIDES = {"qwen2_5_7b_128k.yaml": ["parallel.world_size=32"],
                     "qwen2_5_7b_128k_1node.yaml": ["parallel.world_size=8"],
                     "qwen2_5_7b_32k.yaml": ["parallel.world_size=8"],
                     "qwen3_30b_a3b_rl.yaml": ["parallel.world_size=16"],
                     "qwen3_30b_a3b_rl_32k.yaml": ["parallel.world_size=16"]}


@pytest.fixture
def qwen2_5_7b_models_dir(tmp_path, monkeypatch):
    """A K15_MODELS folder holding Qwen2.5-7B's and Qwen3-30B-A3B's real config.json
    (architecture only)."""
    cfg = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                      max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)
    os.makedirs(tmp_path / "Qwen2.5-7B")
    cfg.to_json_file(str(tmp_path / "Qwen2.5-7B" / "config.json"))
    os.makedirs(tmp_path / "Qwen3-30B-A3B")  # the MoE cluster recipes' model
    (tmp_path / "Qwen3-30B-A3B" / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    monkeypatch.setenv("K15_MODELS", str(tmp_path))
    monkeypatch.delenv("K15_RUNS", raising=False)
    return tmp_path


def test_there_are_examples():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"tiny.yaml", "tiny_schedule.yaml", "qwen2_5_7b_128k.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_loads_and_validates(path, qwen2_5_7b_models_dir, tiny_vl_dirs):
    extra = CLUSTER_OVERRIDES.get(os.path.basename(path), ["parallel.world_size=1"])
    if os.path.basename(path).startswith("tiny_vision"):  # its model folder is written by `k15 tiny --task vision`
        extra = extra + [f"model.hf_path={tiny_vl_dirs['qwen2_vl']}"]
    if os.path.basename(path).startswith("own_"):  # the values the user must give (???)
        with pytest.raises(ConfigError, match=r"model.hf_path: required, no value given"):
            load_config(path, extra, environ={})
        extra = extra + [f"model.hf_path={qwen2_5_7b_models_dir / 'Qwen2.5-7B'}", "data.train_path=t.jsonl",
                         "data.eval_path=e.jsonl"]
    cfg = load_config(path, extra, environ={})  # also on a machine without TE (a login node)
    assert cfg.name and "${" not in cfg.run_dir


def test_cluster_recipe_resolves_to_the_intended_layout(qwen2_5_7b_models_dir):
    path = os.path.join(REPO, "examples", "qwen2_5_7b_128k.yaml")
    cfg = load_config(path, ["parallel.world_size=32"], environ={})
    assert cfg.model.hf_path == str(qwen2_5_7b_models_dir / "Qwen2.5-7B")  # via ${oc.env:...}
    p = cfg.parallel
    assert (p.tensor, p.context, p.pipeline, p.sequence_parallel, p.recompute) == (4, 8, 1, True, "full")
    assert cfg.rollout.max_model_len == 131072 and cfg.precision.dtype == "bf16"
    assert cfg.precision.fp8 is None
    arch = resolve_model_arch(cfg.model)
    assert (arch.num_attention_heads, arch.num_query_groups, arch.add_qkv_bias) == (28, 4, True)
    # FP8 on a machine with Transformer Engine: the 7B GEMM shapes pass the alignment rule.
    load_config(path, ["parallel.world_size=32", "precision.fp8=hybrid"],
                te_available=lambda: True, environ={})


def test_tiny_schedule_interpolations():
    path = os.path.join(REPO, "examples", "tiny_schedule.yaml")
    cfg = load_config(path, ["parallel.tensor=2", "parallel.world_size=2"], environ={})
    assert cfg.name == "tiny-tp2-pp1-seed1234"
    assert cfg.optim.lr_decay_iters == cfg.optim.train_iters == 20
    assert cfg.model.num_layers == 2  # inherited from tiny.yaml through `defaults`


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_recipes_hold_overrides_only(path):
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    defaults = OmegaConf.to_container(OmegaConf.structured(ExperimentConfig), resolve=False)
    for key, value in _leaves(raw):
        default = OmegaConf.select(OmegaConf.create(defaults), key)
        assert value != default, f"{os.path.basename(path)}: {key}={value!r} repeats the default"
