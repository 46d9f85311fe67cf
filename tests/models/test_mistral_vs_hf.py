"""Mistral end to end: HF -> Megatron (TP=2) -> HF -> vLLM, against transformers.

A tiny random Mistral with an explicit head_dim wider than hidden / heads (Mistral-Nemo's shape)
and no sliding window, in one 2-process launch: the library converter writes a TP=2 checkpoint,
Megatron's logits from it match transformers' (1e-4 relative to the largest logit, float32), and
the export under TP=2 returns the original tensors bit for bit. The exported folder then
generates, in the same two processes, in a TP=2 vLLM (CPU) engine made by the rollout engine as
training makes it, the same greedy tokens as transformers' plain argmax decoding.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from distributed import run_distributed
from safetensors.torch import load_file

TOLERANCE = 1e-4
PROMPTS = ("12+7=", "The answer is")
NEW_TOKENS = 12


def _tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 48), generator=torch.Generator().manual_seed(5))


def _worker(rank, world_size, hf_dir, out_root):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from k15_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from k15_megatron.checkpoint.dist_ckpt import load_model
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.device import compute_device
    from k15_megatron.train.schedule import forward_logits

    ckpt, exported = os.path.join(out_root, "ckpt"), os.path.join(out_root, "hf")
    hf_to_megatron(hf_dir, ckpt, tp=2)
    arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
    parallel = ParallelConfig(tensor=2)
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                            padded_vocab=padded_vocab_size(arch.vocab_size, 128, 2))
    load_model(model, ckpt)
    logits = forward_logits(model, _tokens(arch.vocab_size).to(compute_device()))
    logits = gather_from_tensor_model_parallel_region(logits)[..., : arch.vocab_size].cpu()
    megatron_to_hf(ckpt, exported, tp=2, max_shard_bytes=200_000)
    torch.distributed.barrier()  # the export is complete before vLLM reads it
    return logits, exported, _vllm_greedy(exported)


def _vllm_greedy(model_path):
    """Greedy tokens of PROMPTS from a TP=2 engine spanning both ranks."""
    from transformers import AutoTokenizer

    from k15_megatron.config.rl import RepeatConfig
    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.rollout import RolloutEngine, Sampling, expand_prompts

    cfg = RolloutConfig(tensor_parallel_size=2, max_response_tokens=NEW_TOKENS, max_model_len=128,
                        cpu_kv_cache_gib=0.25)
    engine = RolloutEngine.create(cfg, model_path=model_path, repeat=RepeatConfig(enabled=False), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    requests = expand_prompts([torch.tensor(tokenizer.encode(p)) for p in PROMPTS], k=1,
                              token_budget=NEW_TOKENS, max_response_tokens=NEW_TOKENS)
    greedy = Sampling.from_config(cfg, temperature=0.0, ignore_eos=True)
    tokens = [r.tokens.tolist() for r in engine.generate(requests, sampling=greedy)]
    engine.shutdown()
    return tokens


def _tensors(folder: str) -> dict:
    out = {}
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(path))
    return out


def _transformers_greedy(model, prompt_ids, max_new_tokens):
    tokens = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt_ids):]


@pytest.mark.distributed
def test_mistral_converts_matches_transformers_exports_bit_identical_and_generates_in_vllm(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from k15_megatron.models.tiny import save_tiny_hf_model

    hf_dir = save_tiny_hf_model(str(tmp_path / "mistral"), "mistral", init_std=0.1)
    rank_0, rank_1 = run_distributed(_worker, 2, hf_dir, str(tmp_path))
    (logits, exported, vllm_tokens), (logits_1, _, vllm_tokens_1) = rank_0, rank_1
    assert torch.equal(logits, logits_1)  # both TP ranks gathered the same full logits

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(reference).__name__ == "MistralForCausalLM" and reference.config.sliding_window is None
    with torch.no_grad():
        expected = reference(_tokens(reference.config.vocab_size)).logits
    error = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert error < TOLERANCE, f"Mistral TP=2: max relative logit error {error:.2e}"

    original, back = _tensors(hf_dir), _tensors(exported)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), f"{name} changed"
    config = json.load(open(os.path.join(exported, "config.json")))
    assert (config["model_type"], config["head_dim"], config["sliding_window"]) == ("mistral", 32, None)
    assert len(glob.glob(os.path.join(exported, "*.safetensors"))) > 1  # max_shard_bytes splits the export

    tokenizer = AutoTokenizer.from_pretrained(exported)
    exported_model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    expected_tokens = [_transformers_greedy(exported_model, tokenizer.encode(p), NEW_TOKENS) for p in PROMPTS]
    assert vllm_tokens == vllm_tokens_1 == expected_tokens
