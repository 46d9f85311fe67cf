"""Mixture-of-experts HF -> Megatron -> HF with the command-line tools is bit-identical, under
different expert-parallel layouts on each side (each rank reads and writes only its experts):

* Qwen3-MoE: converted with EP=2 (2 processes), exported with TP=2 x EP=1;
* Qwen2-MoE (gated shared expert): converted with PP=2, exported with EP=2;
* DeepSeek-V3 (multi-latent attention, router score-correction bias, ungated shared expert):
  converted with EP=2, exported with PP=2.
"""

from __future__ import annotations

import glob
import json

import pytest
from safetensors.torch import load_file
from tooling import run_tool

LAYOUTS = {"qwen3_moe": (("--ep", "2"), ("--tp", "2")), "qwen2_moe": (("--pp", "2"), ("--ep", "2")),
           "deepseek_v3": (("--ep", "2"), ("--pp", "2"))}


def _tensors(folder: str) -> dict:
    out = {}
    for path in glob.glob(f"{folder}/*.safetensors"):
        out.update(load_file(path))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_moe_roundtrip_is_bit_identical_across_expert_layouts(tiny_moe_hf_dirs, tmp_path, family):
    hf_dir = tiny_moe_hf_dirs[family]
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    into, out_of = LAYOUTS[family]
    for cmd in (["tools/convert_hf_to_megatron.py", "--hf", hf_dir, "--out", ckpt, *into],
                ["tools/convert_megatron_to_hf.py", "--ckpt", ckpt, "--out", back, *out_of]):
        proc = run_tool(*cmd)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    original, exported = _tensors(hf_dir), _tensors(back)
    assert exported.keys() == original.keys()
    assert any(".mlp.experts.3.down_proj." in name for name in exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].equal(tensor), f"{name} changed"
    config = json.load(open(f"{back}/config.json"))
    assert config["model_type"] == family
    if family == "deepseek_v3":
        assert any(name.endswith(".mlp.gate.e_score_correction_bias") for name in exported)
        assert config["first_k_dense_replace"] == 1 and config["kv_lora_rank"] == 512
    else:
        assert config["mlp_only_layers"] == [0]


def test_the_tools_refuse_expert_parallelism_that_does_not_fit(tiny_hf_dirs, tiny_moe_hf_dirs, tmp_path):
    dense = run_tool("tools/convert_hf_to_megatron.py", "--hf", tiny_hf_dirs["qwen2"], "--out",
                     str(tmp_path / "a"), "--ep", "2")
    assert dense.returncode == 2 and "--ep=2: model family 'qwen2' has no experts" in dense.stdout + dense.stderr
    uneven = run_tool("tools/convert_hf_to_megatron.py", "--hf", tiny_moe_hf_dirs["qwen3_moe"], "--out",
                      str(tmp_path / "b"), "--ep", "3")
    assert uneven.returncode == 2 and "--ep=3 must divide the 4 experts" in uneven.stdout + uneven.stderr
