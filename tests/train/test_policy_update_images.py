"""The RL update of a vision-language model (k15_megatron/train/policy_update.py with ``images=``):
packed micro-batches carrying each response's prompt images and M-RoPE positions give the same
log-probs as the padded image recompute.

One process, a tiny Qwen2-VL, a batch from the replay buffer of three groups of 2 responses: a
prompt with one image, a text prompt and a prompt with two images of other sizes (prompt set
read with the model's processor). With ``rl.reference=recompute`` and one optimizer step per
iteration, every packed micro-batch runs before the step, so the loss's log-ratio
log pi_theta (packed, images per sequence) - log pi_i (padded recompute, images per row) is 0 up
to float32 rounding for every sample; a sequence without its images, or with another sequence's
M-RoPE positions, moves it by far more. The step then changes the vision tower (the images reached
the gradient). The model folder's weights are loaded as the jobs load them, and reported as such.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from distributed import run_distributed

K = 2


def _prompts(folder) -> str:
    from PIL import Image

    rng = np.random.default_rng(5)
    for name, (height, width) in {"a.png": (56, 84), "b.png": (56, 56), "c.png": (84, 112)}.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)
    records = [{"prompt": "What is it?", "images": ["a.png"], "answer": "1"},
               {"prompt": "Compute: 4+5", "answer": "9"},
               {"prompt": "<image> or <image>?", "images": ["b.png", "c.png"], "answer": "2"}]
    (folder / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder / "p.jsonl")


def _batch(prompts):
    """Three finished groups of K one-segment responses (random tokens, none an image token)."""
    from k15_megatron.config.rl import ReplayConfig
    from k15_megatron.rl.replay import SegmentReplayBuffer

    g = torch.Generator().manual_seed(7)
    buffer = SegmentReplayBuffer(ReplayConfig(), group_size=K)
    for pid, tokens in enumerate(prompts.token_ids):
        for tid in buffer.add_group(pid, tokens):
            length = int(torch.randint(4, 12, (1,), generator=g))
            buffer.add_segment(tid, torch.randint(3, 90, (length,), generator=g), -torch.rand(length, generator=g),
                               iteration=0, policy_version=0, finish_reason="stop")
    batch = buffer.pop_batch(iteration=0)
    batch.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    return batch


def _update_worker(rank, world_size, hf_dir, data_path):
    from megatron.core import parallel_state as ps

    from k15_megatron.checkpoint.model_init import load_initial_weights
    from k15_megatron.config import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.config.rl import RLConfig
    from k15_megatron.data.images import load_processor
    from k15_megatron.data.prompt_set import PromptSet
    from k15_megatron.models.gpt import padded_vocab_size
    from k15_megatron.models.qwen2_vl import build_qwen2_vl_model
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.optimizer import build_training_objects
    from k15_megatron.train.policy_update import update_policy

    parallel, precision = ParallelConfig(), PrecisionConfig(dtype="fp32")
    initialize(parallel, seed=3)
    arch, vision = resolve_model_arch(ModelConfig(hf_path=hf_dir)), resolve_vision_arch(ModelConfig(hf_path=hf_dir))
    padded = padded_vocab_size(arch.vocab_size, 128, 1)
    model = build_qwen2_vl_model(arch, vision, parallel_cfg=parallel, precision_cfg=precision, padded_vocab=padded)
    source = load_initial_weights(model, ModelConfig(hf_path=hf_dir), arch, padded, vision=vision)
    chunks, optimizer, scheduler = build_training_objects(model, optim_cfg=OptimConfig(lr=1e-3, clip_grad=1.0),
                                                          precision_cfg=precision, num_steps=4)
    layout = types.SimpleNamespace(dp_rank=ps.get_data_parallel_rank(), dp_size=1, tp_size=1)
    trainer = types.SimpleNamespace(layout=layout, chunks=chunks, optimizer=optimizer, scheduler=scheduler, arch=arch)
    processor = load_processor(hf_dir)
    prompts = PromptSet.from_jsonl(data_path, processor.tokenizer, processor=processor)
    batch = _batch(prompts)
    cfg = RLConfig(group_size=K, reference="recompute", groups_per_micro_batch=1, updates_per_iteration=1,
                   logprob_chunk_tokens=16)
    forwards = []  # (position_ids shape, images) of every forward of the model

    def watch(module, args, kwargs):
        grid = kwargs.get("image_grid_thw")
        forwards.append((tuple(args[1].shape), 0 if grid is None else int(grid.shape[0])))

    model.register_forward_pre_hook(watch, with_kwargs=True)
    patch = model.vision.patch_embed.weight.detach().clone()
    metrics = update_policy(trainer, batch, cfg, images=prompts.pixels_of)
    return {"metrics": metrics, "forwards": forwards, "source": source,
            "vision_moved": not torch.equal(patch, model.vision.patch_embed.weight),
            "image_tokens": [int((t == vision.image_token_id).sum()) for t in prompts.token_ids]}


@pytest.mark.distributed
def test_packed_image_update_equals_the_padded_recompute(tiny_vl_dirs, tmp_path):
    (result,) = run_distributed(_update_worker, 1, tiny_vl_dirs["qwen2_vl"], _prompts(tmp_path), timeout_s=600)
    assert result["source"] == f"Hugging Face weights {tiny_vl_dirs['qwen2_vl']}"  # as the jobs log it
    metrics = result["metrics"]
    assert result["image_tokens"][0] > 0 and result["image_tokens"][1] == 0 and result["image_tokens"][2] > 0
    assert metrics["train/num_samples"] == 3 * K and metrics["train/micro_batches_per_update"] == 3
    assert metrics["train/log_ratio_abs_max"] < 1e-5, metrics
    # forwards: the padded recompute (3 row micro-batches of K rows: [3, K, S]), then the packed
    # update (one group per micro-batch: [3, 1, T]), each with its group's images (K x 1, 0, K x 2).
    recompute, update = result["forwards"][:3], result["forwards"][3:]
    assert [shape[:2] for shape, _ in recompute] == [(3, K)] * 3
    assert [shape[:2] for shape, _ in update] == [(3, 1)] * 3
    assert [images for _, images in update] == [K, 0, 2 * K] == [images for _, images in recompute]
    assert result["vision_moved"]
