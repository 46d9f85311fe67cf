"""``k15 merge``: the weighted mean of two checkpoints, bit for bit, from Hugging Face folders and
from a k15 checkpoint saved under TP=2; inputs of two architectures refused naming the culprit."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tooling import run_tool

WEIGHT = 0.3


def _tensors(folder: str) -> dict:
    from k15_megatron.checkpoint.safetensors_io import HFTensorReader

    reader = HFTensorReader(folder)
    return {name: reader.get(name) for name in sorted(reader.names())}


def _expected(a: str, b: str) -> dict:
    """The weighted mean, computed here in float64 and rounded once to float32."""
    ta, tb = _tensors(a), _tensors(b)
    return {n: ((1 - WEIGHT) * ta[n].double() + WEIGHT * tb[n].double()).float() for n in ta}


@pytest.fixture(scope="module")
def llama_b(tmp_path_factory, tiny_hf_dirs):
    """A second tiny Llama: the conftest one's architecture, other random weights."""
    from k15_megatron.models.tiny import save_tiny_hf_model

    folder = save_tiny_hf_model(str(tmp_path_factory.mktemp("merge") / "llama_b"), "llama", seed=1, init_std=0.1,
                                max_shard_size="150KB")
    with open(os.path.join(folder, "config.json")) as f, open(os.path.join(tiny_hf_dirs["llama"], "config.json")) as g:
        assert json.load(f) == json.load(g)
    return folder


def test_merge_of_hf_folders_is_the_weighted_mean_and_loads(tiny_hf_dirs, llama_b, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from k15_megatron.jobs.merge import main

    a, out = tiny_hf_dirs["llama"], str(tmp_path / "merged")
    assert main([a, llama_b, "--out", out, "--weight", str(WEIGHT)]) == 0
    merged, expected = _tensors(out), _expected(a, llama_b)
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        assert merged[name].dtype == torch.float32 and torch.equal(merged[name], value), name
    assert not torch.equal(merged["model.embed_tokens.weight"], _tensors(a)["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(model.model.embed_tokens.weight.detach(), expected["model.embed_tokens.weight"])
    assert AutoTokenizer.from_pretrained(out).vocab_size == AutoTokenizer.from_pretrained(a).vocab_size
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging or scratch left


def test_merge_reads_a_k15_checkpoint_of_any_layout(roundtrip_dirs, tiny_hf_dirs, llama_b, tmp_path):
    ckpt, _ = roundtrip_dirs["llama"]  # converted from tiny_hf_dirs["llama"] under TP=2
    out = str(tmp_path / "merged")
    proc = run_tool("-m", "k15_megatron.cli", "merge", ckpt, llama_b, "--out", out, "--weight", str(WEIGHT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("merge: wrote ")
    merged = _tensors(out)
    for name, value in _expected(tiny_hf_dirs["llama"], llama_b).items():
        assert torch.equal(merged[name], value), name
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def _copy_with(folder: str, dst: str, change) -> str:
    """A copy of HF folder ``folder`` whose tensors went through ``change(dict)``."""
    shutil.copytree(folder, dst)
    for name in os.listdir(dst):
        if name.endswith(".safetensors"):
            path = os.path.join(dst, name)
            tensors = load_file(path)
            change(tensors)
            save_file(tensors, path, metadata={"format": "pt"})
    return dst


def test_two_architectures_are_refused_naming_the_culprit(tiny_hf_dirs, tmp_path):
    from k15_megatron.checkpoint.merge import check_same_model
    from k15_megatron.jobs.merge import check_merge

    llama, qwen3 = tiny_hf_dirs["llama"], tiny_hf_dirs["qwen3"]
    with pytest.raises(ValueError, match="not the same architecture: family"):
        check_same_model(llama, qwen3)
    # one model.safetensors (no index): tensors can be added in place
    assert os.path.exists(os.path.join(qwen3, "model.safetensors"))
    bias = "model.layers.0.self_attn.q_proj.bias"
    extra = _copy_with(qwen3, str(tmp_path / "extra"), lambda t: t.__setitem__(bias, torch.zeros(3)))
    with pytest.raises(ValueError, match=f"tensor '{bias}' is in {extra} but not in {qwen3}"):
        check_same_model(qwen3, extra)
    name = "model.layers.1.mlp.up_proj.weight"
    # a reshape keeps the tensor and the config, changes only the shape
    cut = _copy_with(qwen3, str(tmp_path / "cut"), lambda t: t.__setitem__(name, t[name].reshape(-1, 8)))
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape"):
        check_same_model(qwen3, cut)
    with pytest.raises(ValueError, match="--weight 1.5"):
        check_merge(llama, llama, str(tmp_path / "new"), weight=1.5, overwrite=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--overwrite"):
        check_merge(llama, llama, str(tmp_path / "used"), weight=0.5, overwrite=False)
