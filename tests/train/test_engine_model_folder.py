"""The rollout engine starts from a folder whose config.json is the architecture Megatron uses."""

import json
import os
from types import SimpleNamespace

from k15_megatron.config import ModelConfig, resolve_model_arch
from k15_megatron.train.setup import engine_model_folder

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def _trainer(tmp_path, model_cfg):
    cfg = SimpleNamespace(model=model_cfg, run_dir=str(tmp_path / "run"))
    return SimpleNamespace(cfg=cfg, arch=resolve_model_arch(model_cfg), is_logging_rank=True, tokenizer=None)


def test_folder_used_as_is_when_it_describes_the_model(tiny_hf_dirs, tmp_path):
    hf = tiny_hf_dirs["qwen2"]
    assert engine_model_folder(_trainer(tmp_path, ModelConfig(hf_path=hf)), assets="") == hf


def test_overrides_of_the_folder_config_reach_the_engine_folder(tiny_hf_dirs, tmp_path):
    hf = tiny_hf_dirs["qwen2"]
    model_cfg = ModelConfig(hf_path=hf, rope_scaling=dict(YARN), max_position_embeddings=256)
    trainer = _trainer(tmp_path, model_cfg)
    path = engine_model_folder(trainer, assets="")
    assert path == os.path.join(str(tmp_path / "run"), "hf_engine")
    assert resolve_model_arch(ModelConfig(hf_path=path)) == trainer.arch
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["max_position_embeddings"] == 256
    weights = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    assert weights and all(os.path.islink(os.path.join(path, n)) for n in weights)
    with open(os.path.join(hf, "config.json")) as f:
        assert "yarn" not in json.dumps(json.load(f))  # the user's folder is untouched
