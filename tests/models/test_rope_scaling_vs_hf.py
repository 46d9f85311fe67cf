"""Scaled RoPE end to end: a tiny Qwen2 with YaRN (factor 4 over 64 original positions, its
config.json in the older ``rope_scaling``/``type`` layout users edit) and a tiny Llama with llama3
scaling (transformers 5 ``rope_parameters`` layout), on 256-token sequences, well past the
original context.

One Megatron process converts each HF folder (``hf_to_megatron``), runs the converted model and
exports it back (``megatron_to_hf``). Checked here, float32:

* Megatron's logits equal transformers' on the original folder (1e-4 of the largest logit), while
  the same weights without the scaling are far off (so the scaling is exercised);
* the exported folder carries the same rope scaling and gives transformers the same logits;
* vLLM reads the same rope parameters from the original (older layout) and the exported
  config.json; started from the exported folder the way the rollout engine starts, it gives the
  log-probs of the prompt tokens Megatron gives, and sampled-token log-probs equal to
  transformers', on a 200-token prompt (> 64 original positions).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from distributed import run_distributed

SEQ_LEN = 256
PROMPT_LEN = 200
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _where(error: torch.Tensor) -> str:
    """For a failure message: the worst positions of a [..., S] error and the CPU it ran on (a
    mismatch here has been seen on one machine only)."""
    per_position = error.reshape(-1, error.shape[-1]).amax(0) if error.dim() > 1 else error
    worst = per_position.topk(min(5, per_position.numel()))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown")
    return (f"worst positions {worst.indices.tolist()} ({[f'{v:.1e}' for v in worst.values.tolist()]}); CPU {cpu}, "
            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")


def _tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))


def _worker(rank, world_size, hf_dirs, out_root):
    from k15_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from k15_megatron.checkpoint.dist_ckpt import load_model
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.device import compute_device
    from k15_megatron.train.schedule import forward_logits

    logits = {}
    for family, hf_dir in hf_dirs.items():
        ckpt = os.path.join(out_root, f"{family}_ckpt")
        hf_to_megatron(hf_dir, ckpt)
        arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
        model = build_gpt_model(arch, parallel_cfg=ParallelConfig(), precision_cfg=PrecisionConfig(dtype="fp32"),
                                padded_vocab=padded_vocab_size(arch.vocab_size, 128, 1))
        load_model(model, ckpt)
        out = forward_logits(model, _tokens(arch.vocab_size).to(compute_device()))
        logits[family] = out[..., : arch.vocab_size].float().cpu()
        megatron_to_hf(ckpt, os.path.join(out_root, f"{family}_hf"))
    return logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(original HF folders, exported HF folders, Megatron logits [2, SEQ_LEN, V]) per family."""
    from k15_megatron.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("rope_scaling")
    qwen2 = save_tiny_hf_model(str(root / "qwen2_yarn"), "qwen2", init_std=0.1, rope_theta=10000.0,
                               max_position_embeddings=SEQ_LEN)
    config_path = os.path.join(qwen2, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("rope_parameters")
    config.update(rope_theta=10000.0, rope_scaling=dict(YARN))  # the older layout, as users write it
    with open(config_path, "w") as f:
        json.dump(config, f)
    llama = save_tiny_hf_model(str(root / "llama_llama3"), "llama", init_std=0.1)  # llama3 scaling, 64 positions
    originals = {"qwen2": qwen2, "llama": llama}
    [logits] = run_distributed(_worker, 1, originals, str(root), timeout_s=500)
    exported = {family: str(root / f"{family}_hf") for family in originals}
    return originals, exported, logits


def _hf_logits(folder: str, tokens: torch.Tensor, **config_changes) -> torch.Tensor:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["qwen2", "llama"], ids=["qwen2-yarn", "llama-llama3"])
def test_megatron_and_export_match_transformers_past_the_original_context(converted, family):
    from k15_megatron.config import ModelConfig, resolve_model_arch

    originals, exported, logits = converted
    tokens = _tokens(logits[family].shape[-1])
    reference = _hf_logits(originals[family], tokens)
    assert _relative_error(logits[family], reference) < 1e-4, _where((logits[family] - reference).abs().amax(-1))
    theta = resolve_model_arch(ModelConfig(hf_path=originals[family])).rope_theta
    unscaled = _hf_logits(originals[family], tokens, rope_parameters={"rope_type": "default", "rope_theta": theta})
    assert _relative_error(unscaled, reference) > 1e-2, "the test sequence does not exercise the rope scaling"

    # the exported folder: same rope scaling in both keys transformers and vLLM read, same logits
    arch = resolve_model_arch(ModelConfig(hf_path=originals[family]))
    assert resolve_model_arch(ModelConfig(hf_path=exported[family])) == arch
    with open(os.path.join(exported[family], "config.json")) as f:
        written = json.load(f)
    assert written["rope_scaling"] == arch.rope_scaling
    assert written["rope_parameters"] == {**arch.rope_scaling, "rope_theta": theta}
    assert torch.equal(_hf_logits(exported[family], tokens), reference)


def _vllm_worker(rank, world_size, folder, prompt):
    """In its own process (an engine torn down in the test process would take vLLM's global
    state from the session's shared engine): the rollout engine on ``folder``; its prompt-token
    log-probs of ``prompt`` and 24 sampled tokens with their log-probs."""
    from vllm import SamplingParams

    from k15_megatron.config.rl import RepeatConfig
    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.rollout import RolloutEngine, Sampling, SegmentRequest

    cfg = RolloutConfig(max_model_len=SEQ_LEN, max_response_tokens=SEQ_LEN - PROMPT_LEN,
                        cpu_kv_cache_gib=0.125, max_num_seqs=4)
    engine = RolloutEngine.create(cfg, model_path=folder, repeat=RepeatConfig(enabled=False), seed=0)
    [out] = engine.llm.generate([{"prompt_token_ids": prompt.tolist()}],
                                SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
    prompt_logprobs = torch.tensor([entry[tok].logprob for entry, tok in zip(out.prompt_logprobs[1:], prompt[1:].tolist())])
    request = SegmentRequest(trajectory_id=0, prompt_tokens=prompt, response_tokens=torch.zeros(0, dtype=torch.long),
                             token_budget=24, max_response_tokens=24)
    sampling = Sampling.from_config(engine.cfg, temperature=1.0, seed=3, ignore_eos=True)
    [result] = engine.generate([request], sampling=sampling)
    return {"prompt_logprobs": prompt_logprobs, "tokens": result.tokens.clone(), "logprobs": result.logprobs.clone()}


@pytest.mark.distributed
def test_vllm_logprobs_equal_megatron_and_transformers_with_yarn(converted):
    from vllm.transformers_utils.config import get_config

    originals, exported, logits = converted
    # vLLM reads the same rope parameters from the user's older layout and from the export
    rope = [{k: v for k, v in get_config(folder, trust_remote_code=False).rope_parameters.items() if k != "type"}
            for folder in (originals["qwen2"], exported["qwen2"])]
    assert rope[0] == rope[1] and rope[0]["rope_type"] == "yarn", rope

    prompt = _tokens(logits["qwen2"].shape[-1])[0, :PROMPT_LEN]
    [out] = run_distributed(_vllm_worker, 1, exported["qwen2"], prompt, timeout_s=500)
    # prompt-token log-probs vs Megatron's, position by position up to 200
    megatron = torch.log_softmax(logits["qwen2"][0, : PROMPT_LEN - 1], dim=-1).gather(1, prompt[1:, None])[:, 0]
    assert (out["prompt_logprobs"] - megatron).abs().max() < 1e-4, _where((out["prompt_logprobs"] - megatron).abs())
    # sampled-token log-probs of the rollout path vs transformers on the same folder
    tokens = out["tokens"]
    assert tokens.numel() == 24
    hf = _hf_logits(exported["qwen2"], torch.cat([prompt, tokens])[None])[0]
    hf_logprobs = torch.log_softmax(hf[PROMPT_LEN - 1:-1], dim=-1).gather(1, tokens[:, None])[:, 0]
    assert (out["logprobs"] - hf_logprobs).abs().max() < 1e-4
