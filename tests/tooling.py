"""Small helpers shared by test files (kept out of conftest.py, which is not importable by name
when several conftest files exist)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_config(tmp_path, config, name: str = "m") -> str:
    """``config.save_pretrained`` (a transformers config) into ``tmp_path/name``; returns the folder."""
    folder = tmp_path / name
    config.save_pretrained(str(folder))
    return str(folder)


def save_config_json(tmp_path, data: dict, name: str = "m") -> str:
    """``data`` as the config.json of a new folder ``tmp_path/name``; returns the folder."""
    import json

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(data))
    return str(folder)


def run_tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository root; returns the CompletedProcess."""
    env = {"K15_STRICT_DEVICE": "1", **os.environ}  # see tests/conftest.py
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def megatron_from_hf(hf_dir: str, *, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, seed: int = 3, lr: float = 1e-2,
                     clip_grad: float = 1.0, train_iters: int = 10, optimizer: str = "adam"):
    """Inside a rank: start the parallel state, build the Megatron model of ``hf_dir`` with its HF
    weights, wrap it for training. Returns (arch, model, chunks, optimizer, scheduler)."""
    from k15_megatron.checkpoint.model_weights import load_hf_weights
    from k15_megatron.config import (ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig,
                                     resolve_model_arch)
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.optimizer import build_training_objects

    parallel = ParallelConfig(tensor=tp, pipeline=pp, context=cp, expert=ep)
    precision = PrecisionConfig(dtype="fp32")
    initialize(parallel, seed=seed)
    arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
    padded = padded_vocab_size(arch.vocab_size, 128, tp)
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=precision, padded_vocab=padded)
    load_hf_weights(model, hf_dir, arch, padded)
    chunks, optimizer, scheduler = build_training_objects(
        model, optim_cfg=OptimConfig(lr=lr, clip_grad=clip_grad, optimizer=optimizer), precision_cfg=precision,
        num_steps=train_iters)
    return arch, model, chunks, optimizer, scheduler


def single_segment_batch(ids, lengths, rewards, *, group_size: int, prompt_tokens: int, generator):
    """A RolloutBatch of finished one-segment responses: ``ids`` [B, T] (zeroed past each
    sample), ``prompt_tokens`` prompt tokens then ``lengths`` [B] response tokens, random
    behaviour log-probs in (-6, 0] drawn from ``generator``, ``rewards`` [B]."""
    import torch

    from k15_megatron.rl.batch import RolloutBatch

    b, t = ids.shape
    pos = torch.arange(t)
    attention = pos < (prompt_tokens + lengths)[:, None]
    response = attention & (pos >= prompt_tokens)
    ids = torch.where(attention, ids, torch.zeros_like(ids))
    behaviour = torch.where(response, -torch.rand(b, t, generator=generator) * 6, torch.zeros(b, t))
    return RolloutBatch(
        input_ids=ids, attention_mask=attention, response_mask=response, loss_mask=response.clone(),
        behaviour_logprobs=behaviour, segment_index=torch.where(response, 0, -1).int(),
        prompt_lengths=torch.full((b,), prompt_tokens), response_lengths=lengths, trajectory_ids=torch.arange(b),
        prompt_ids=torch.arange(b) // group_size, segment_iterations=torch.zeros(b, 1, dtype=torch.long),
        segment_policy_versions=torch.zeros(b, 1, dtype=torch.long), num_segments=torch.ones(b, dtype=torch.long),
        finish_reasons=["stop"] * b, group_size=group_size, rewards=rewards)
