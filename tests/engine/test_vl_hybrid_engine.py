"""The colocated hybrid engine with a vision-language model: Qwen2-VL and Qwen2.5-VL (window
attention, SwiGLU vision blocks) under Megatron TP=2 and one vLLM TP=2 engine in the same two CPU
processes (gloo), generating from image prompts.

Each of two rounds trains the model on an image prompt (so the vision tower and merger change
too), then ``to_rollout`` syncs the weights in place; after each sync:

* the engine's own log-prob check runs on image prompts (``RolloutEngine.sample_for_check``:
  one random image per prompt, the same images in both rounds, so round 2 would meet images
  vLLM embedded with the old weights) and must stay within 1e-4 (float32);
* an image prompt and a text prompt, 2 samples each, are generated as partial rollouts through
  the replay buffer (``rollout_iteration`` with ``images_of``): every first segment stops at its
  token budget, the second continues from prompt + first segment with the same image; Megatron's
  recomputed log-probs of the popped batch (``sequence_token_logprobs`` with each row's image
  inputs) equal vLLM's within 1e-4 on every response token;
* vLLM's patch embedding equals Megatron's (and differs from the initial one): the vision
  tower travelled in the stream.

vLLM's own behaviour is pinned too: a token prompt whose image placeholder is already expanded
gets expanded again (which is why the engine collapses each run first); and, last, after an
in-place reload WITHOUT resetting the engine's encoder cache, a request with an image vLLM has
embedded before fails with "Encoder cache miss" (``reload_weights`` clears the worker's cached
embeddings, not the scheduler's records of them), which is why the weight sync resets the cache.
"""

import numpy as np
import pytest
import torch
from distributed import run_distributed

from k15_megatron.models.tiny_vl import IMAGE_PLACEHOLDER

PROMPT = f"<|im_start|>user\n{IMAGE_PLACEHOLDER}What is this?<|im_end|>\n<|im_start|>assistant\n"
TOLERANCE = 1e-4


def _image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(3).integers(0, 255, (56, 84, 3), dtype=np.uint8))


def _probe_inputs(hf_dir: str) -> dict:
    from transformers import AutoProcessor

    inputs = AutoProcessor.from_pretrained(hf_dir)(text=[PROMPT], images=[_image()], return_tensors="pt")
    return {"input_ids": inputs["input_ids"][0], "pixel_values": inputs["pixel_values"],
            "image_grid_thw": inputs["image_grid_thw"]}


def _text_prompt(hf_dir: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    text = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    return torch.tensor(AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"])


def _vl_trainer(hf_dir: str, *, tp: int):
    from k15_megatron.checkpoint.vl_weights import load_vl_hf_weights
    from k15_megatron.config import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.models.gpt import padded_vocab_size
    from k15_megatron.models.qwen2_vl import build_qwen2_vl_model
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.optimizer import build_training_objects

    parallel, precision = ParallelConfig(tensor=tp), PrecisionConfig(dtype="fp32")
    initialize(parallel, seed=5)
    arch, vision = resolve_model_arch(ModelConfig(hf_path=hf_dir)), resolve_vision_arch(ModelConfig(hf_path=hf_dir))
    padded = padded_vocab_size(arch.vocab_size, 128, tp)
    model = build_qwen2_vl_model(arch, vision, parallel_cfg=parallel, precision_cfg=precision, padded_vocab=padded)
    load_vl_hf_weights(model, hf_dir, arch, vision, padded)
    chunks, optimizer, scheduler = build_training_objects(model, optim_cfg=OptimConfig(lr=1e-2, clip_grad=1.0),
                                                          precision_cfg=precision, num_steps=10)
    return arch, vision, model, chunks, optimizer, scheduler


def _image_batch(probe: dict, vision) -> dict:
    """One padded training micro-batch: the image prompt followed by an answer."""
    from k15_megatron.models.qwen2_vl import mrope_position_ids

    ids = torch.cat([probe["input_ids"], torch.tensor([40, 41, 42, 43, 44, 45, 2])]).unsqueeze(0)
    positions = mrope_position_ids(ids[:, :-1], probe["image_grid_thw"], image_token_id=vision.image_token_id,
                                   vision_start_token_id=vision.vision_start_token_id,
                                   spatial_merge_size=vision.spatial_merge_size)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": positions,
            "pixel_values": probe["pixel_values"], "image_grid_thw": probe["image_grid_thw"]}


def _vllm_patch_embedding(llm) -> torch.Tensor:
    return llm.collective_rpc(lambda worker: worker.model_runner.get_model().visual.patch_embed.proj.weight
                              .detach().clone())[0]


def _vllm_prompt_length(llm, expanded: list[int], image):
    """How long vLLM makes a prompt whose image placeholder is ALREADY expanded (or its error)."""
    from vllm import SamplingParams

    try:
        out = llm.generate([{"prompt_token_ids": expanded, "multi_modal_data": {"image": [image]}}],
                           SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"{type(exc).__name__}: {exc}"
    return len(out[0].prompt_token_ids)


def _partial_rollout_diff(rollout, chunks, prompts, recompute, sampling, *, iteration: int) -> dict:
    """Partial rollouts through the replay buffer: a group of 2 samples per prompt (an image
    prompt, a text prompt), generated in two segments of 8 tokens (the second continues prompt +
    first segment with the same image, looked up by prompt id); max |vLLM - Megatron| over all
    response tokens, Megatron recomputing the whole batch with each row's image inputs."""
    from k15_megatron.config.rl import ReplayConfig
    from k15_megatron.rl.replay import SegmentReplayBuffer
    from k15_megatron.rollout.partial import rollout_iteration

    buffer = SegmentReplayBuffer(ReplayConfig(segment_token_budget=8, max_segments=4), group_size=2)
    images_of = {pid: prompt["images"] for pid, prompt in prompts.items()}.__getitem__
    rollout_iteration(rollout, buffer, [(pid, p["input_ids"]) for pid, p in prompts.items()], iteration=iteration,
                      sampling=sampling, images_of=images_of)
    continued = len(buffer.unfinished())
    rollout_iteration(rollout, buffer, [], iteration=iteration + 1, sampling=sampling, images_of=images_of)
    batch = buffer.pop_batch(iteration=iteration + 1)
    rows = [prompts[int(pid)]["inputs"] for pid in batch.prompt_ids]
    trainer = recompute(chunks, batch.input_ids, lengths=batch.prompt_lengths + batch.response_lengths,
                        images=rows).cpu()
    mask = batch.response_mask[:, 1:]
    diff = (trainer - batch.behaviour_logprobs[:, 1:]).abs()[mask]
    responses = batch.input_ids[batch.response_mask]
    return {"continued": continued, "segments": batch.num_segments.tolist(), "reasons": batch.finish_reasons,
            "num_tokens": int(mask.sum()), "max_diff": float(diff.max()),
            "logprobs": batch.behaviour_logprobs[batch.response_mask],
            "image_tokens_sampled": bool((responses == rollout.vision.image_token_id).any())}


def _vl_hybrid_worker(rank, world_size, hf_dir, probe, image, text_ids):
    import functools

    from k15_megatron.config.engine import EngineConfig
    from k15_megatron.config.rl import RepeatConfig
    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.engine.hybrid import HybridEngine
    from k15_megatron.engine.weight_stream import iter_model_hf_tensors
    from k15_megatron.engine.weight_sync import ColocatedWeightSync
    from k15_megatron.models.gpt import unwrap_model
    from k15_megatron.rollout.engine import RolloutEngine, Sampling
    from k15_megatron.train.logprobs import sequence_token_logprobs
    from k15_megatron.train.step import train_step

    arch, vision, model, chunks, optimizer, scheduler = _vl_trainer(hf_dir, tp=2)
    rollout_cfg = RolloutConfig(tensor_parallel_size=2, max_response_tokens=16, max_model_len=256,
                                cpu_kv_cache_gib=0.25, max_num_seqs=8)
    rollout = RolloutEngine.create(rollout_cfg, model_path=hf_dir, repeat=RepeatConfig(enabled=False), seed=0)
    recompute = functools.partial(sequence_token_logprobs, vocab_size=arch.vocab_size)
    hybrid = HybridEngine(model_chunks=chunks, optimizer=optimizer, arch=arch, rollout=rollout,
                          weight_sync=ColocatedWeightSync(rollout.llm, dtype=torch.float32),
                          cfg=EngineConfig(check_num_sequences=3, check_max_tokens=16, check_max_abs_diff=TOLERANCE),
                          reset_optimizer=True, recompute_logprobs=recompute)
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, seed=11, ignore_eos=True)
    initial_patch = _vllm_patch_embedding(rollout.llm)
    expanded_prompt = _vllm_prompt_length(rollout.llm, probe["input_ids"].tolist(), image)
    prompts = {7: {"input_ids": probe["input_ids"], "images": (image,),
                   "inputs": {"pixel_values": probe["pixel_values"], "image_grid_thw": probe["image_grid_thw"]}},
               8: {"input_ids": text_ids, "images": (), "inputs": None}}
    before = _partial_rollout_diff(rollout, chunks, prompts, recompute, sampling, iteration=0)  # caches the image
    batch = [_image_batch(probe, vision)]
    rounds = []
    for version in (1, 2):
        if hybrid.mode == "rollout":
            hybrid.to_train()
        for _ in range(2):
            train_step(chunks, optimizer, scheduler, batch)
        metrics = hybrid.to_rollout(policy_version=version)
        probe_round = _partial_rollout_diff(rollout, chunks, prompts, recompute, sampling, iteration=2 * version)
        megatron_patch = unwrap_model(chunks[0]).vision.patch_embed.weight.detach().reshape(initial_patch.shape)
        vllm_patch = _vllm_patch_embedding(rollout.llm)
        rounds.append({"check_max": metrics["logprob_check/max_abs_diff"],
                       "check_tokens": metrics["logprob_check/num_tokens"], "probe": probe_round,
                       "probe_changed": not torch.allclose(probe_round["logprobs"], before["logprobs"], atol=1e-3),
                       "patch_synced": torch.equal(vllm_patch, megatron_patch),
                       "patch_changed": not torch.equal(vllm_patch, initial_patch)})

    # vLLM's behaviour without the encoder-cache reset: reload in place, reset the prefix cache only.
    def reload(worker):
        worker.model_runner.reload_weights(weights_iterator=iter_model_hf_tensors(chunks[0], arch, dtype=torch.float32))

    rollout.llm.collective_rpc(reload)
    rollout.llm.reset_prefix_cache()
    try:
        _partial_rollout_diff(rollout, chunks, prompts, recompute, sampling, iteration=10)
        without_reset = "no error"
    except Exception as exc:  # noqa: BLE001 - the message is the result
        without_reset = f"{type(exc).__name__}: {exc}"
    return {"before": before, "rounds": rounds, "without_reset": without_reset, "expanded_prompt": expanded_prompt}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vl_weight_sync_makes_vllm_image_logprobs_equal_megatron(tiny_vl_dirs, family):
    hf_dir = tiny_vl_dirs[family]
    probe = _probe_inputs(hf_dir)
    assert probe["image_grid_thw"].tolist() == [[1, 4, 6]]  # 6 image tokens in the expanded prompt
    text_ids = _text_prompt(hf_dir)
    per_rank = run_distributed(_vl_hybrid_worker, 2, hf_dir, probe, _image(), text_ids, timeout_s=600)
    for rank, out in enumerate(per_rank):
        assert out["before"]["max_diff"] < TOLERANCE, (rank, out["before"]["max_diff"])
        for version, r in enumerate(out["rounds"], start=1):
            where = f"rank {rank} round {version}"
            assert r["check_tokens"] > 0 and r["check_max"] < TOLERANCE, (where, r["check_max"])
            probe_round = r["probe"]
            assert probe_round["continued"] == 4 and probe_round["segments"] == [2] * 4, where
            assert probe_round["reasons"] == ["max_length"] * 4 and probe_round["num_tokens"] == 4 * 16, where
            assert probe_round["max_diff"] < TOLERANCE, (where, probe_round["max_diff"])
            assert not probe_round["image_tokens_sampled"], where
            assert r["probe_changed"], f"{where}: training + sync did not change vLLM's outputs"
            assert r["patch_synced"] and r["patch_changed"], f"{where}: the vision tower was not synced"
        assert "Encoder cache miss" in out["without_reset"], (rank, out["without_reset"])
        # vLLM expands placeholders itself: an expanded prompt gains 6 - 1 stray pad tokens.
        assert out["expanded_prompt"] == probe["input_ids"].numel() + 5, out["expanded_prompt"]
