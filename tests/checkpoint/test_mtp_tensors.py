"""DeepSeek-V3 checkpoints ship their multi-token-prediction layers after the decoder
(``model.layers.{num_hidden_layers}.*``): loading skips them, as transformers does, while any
other tensor the config.json does not explain is still refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from k15_megatron.checkpoint.model_weights import _check_hf_names
from k15_megatron.checkpoint.safetensors_io import HFTensorReader
from k15_megatron.config import ModelConfig, resolve_model_arch
from k15_megatron.models.tiny import save_tiny_hf_model


def _with_extra(folder: str, name: str) -> HFTensorReader:
    tensors = load_file(f"{folder}/model.safetensors")
    tensors[name] = torch.zeros(4, 4)
    save_file(tensors, f"{folder}/model.safetensors")
    return HFTensorReader(folder)


def test_mtp_layers_are_skipped_and_other_extras_refused(tmp_path):
    folder = save_tiny_hf_model(str(tmp_path / "ds"), "deepseek_v3", num_hidden_layers=2)
    arch = resolve_model_arch(ModelConfig(hf_path=folder))
    _check_hf_names(_with_extra(folder, "model.layers.2.eh_proj.weight"), arch)  # the MTP layer: skipped
    with pytest.raises(ValueError, match=r"unexpected: \['model.layers.1.self_attn.q_proj.weight'\]"):
        _check_hf_names(_with_extra(folder, "model.layers.1.self_attn.q_proj.weight"), arch)
