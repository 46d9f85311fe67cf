"""HF -> Megatron -> HF through the command-line tools, with different layouts on each side.

The exported tensors must equal the originals bit for bit (same names, dtypes and values), the
exported folder must be sharded safetensors with an index, and it must load and generate in
transformers and in vLLM (the session engine runs the exported Qwen2 folder) with identical
greedy tokens.
"""

import glob
import json
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def _load_all(folder):
    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def test_roundtrip_is_bit_identical(tiny_hf_dirs, roundtrip_dirs):
    for family, (_, exported) in roundtrip_dirs.items():
        original, back = _load_all(tiny_hf_dirs[family]), _load_all(exported)
        assert set(original) == set(back), f"{family}: names differ: {set(original) ^ set(back)}"
        for name, tensor in original.items():
            assert back[name].dtype == tensor.dtype, f"{family} {name}: dtype changed"
            assert torch.equal(back[name], tensor), f"{family} {name}: values changed"


def test_export_is_sharded_with_index(roundtrip_dirs):
    _, exported = roundtrip_dirs["llama"]
    with open(os.path.join(exported, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = set(index["weight_map"].values())
    assert len(files) > 1, "expected several shards with --max-shard-size-mb 1"
    assert all(os.path.exists(os.path.join(exported, f)) for f in files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _load_all(exported).values())
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["model_type"] == "llama" and config["rope_scaling"]["rope_type"] == "llama3"


def _transformers_greedy(folder, prompt_ids, max_new_tokens):
    """Plain argmax decoding with transformers' forward (EOS is just another token here, as with
    vLLM's ignore_eos), so nothing in generate()'s logits processing can differ."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt_ids):]


def test_exported_folder_generates_same_greedy_tokens_in_transformers_and_vllm(roundtrip_dirs, vllm_engine):
    from vllm import SamplingParams

    _, exported = roundtrip_dirs["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompts = ["12+7=", "The answer is", "x*y-3"]
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = vllm_engine.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    for ids, output in zip(prompt_ids, outputs):
        ours = list(output.outputs[0].token_ids)
        assert len(ours) == 16
        assert ours == _transformers_greedy(exported, ids, 16)
