"""One SFT step of a vision-language model on a packed (THD) micro-batch of mixed text and image
examples gives transformers' loss and gradients, and the packed micro-batch gives what the padded
one gives.

Data: a JSONL of three records read by SftSet with the model folder's processor (a text record;
one 56x84 image; two images of different sizes placed with ``<image>`` marks), packed into one
row by the SFT packing and cut into the micro-batch ``k15 sft`` trains on
(:func:`k15_megatron.jobs.sft.sft_micro_batches`: each example its own sequence, its images and
its own M-RoPE positions). Reference: transformers' Qwen2VLForConditionalGeneration (float32),
each example alone, the loss the token mean of the response tokens' cross-entropy over all three
(over the tokenizer's 105 tokens: the SFT step masks out the output layer's padding rows, which
get exactly zero gradient, k15_megatron.train.vocab_padding).
One launch of 2 gloo processes runs Qwen2-VL at TP=2 and PP=2 (vision tower on the first stage)
and Qwen2.5-VL (window attention) at PP=2; in each,
the packed micro-batch and a padded [3, S] batch (right padding, loss mask 0 there) run forward
and backward through Megatron's schedule with the SFT loss; gradients are mapped to transformers'
names with the checkpoint mapping (vl_weights.iter_vl_hf_tensors).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from distributed import run_cases

LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4  # relative to each tensor's largest reference gradient
LAYOUTS = {"TP2": (2, 1), "PP2": (1, 2)}
CASES = (("qwen2_vl", "TP2"), ("qwen2_vl", "PP2"), ("qwen2_5_vl", "PP2"))
PADDED_VOCAB = 128  # padded_vocab_size(105 tokens, 128, TP <= 2)


def _sft_set(hf_dir: str, tmp_path):
    from PIL import Image

    from k15_megatron.data.images import load_processor
    from k15_megatron.data.sft_set import SftSet

    rng = np.random.default_rng(7)
    for name, (h, w) in {"a.png": (56, 84), "b.png": (56, 56), "c.png": (84, 112)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    records = [{"prompt": "Add 2 and 3.", "response": "5, since 2+3=5"},
               {"prompt": "What is drawn?", "images": ["a.png"], "response": "noise"},
               {"prompt": "Is <image> bigger than <image>?", "images": ["b.png", "c.png"], "response": "no, smaller"}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    processor = load_processor(hf_dir)
    return SftSet.from_jsonl(str(tmp_path / "sft.jsonl"), processor.tokenizer, seq_length=512, processor=processor)


def _grads_as_hf(model, arch, vision) -> dict:
    """transformers-named full gradients of this rank's stage (TP shards gathered by the mapping)."""
    from k15_megatron.checkpoint.vl_weights import iter_vl_hf_tensors

    saved = {}
    for param in model.parameters():
        saved[param] = param.data
        param.data = param.grad if param.grad is not None else torch.zeros_like(param)
    try:
        return {name: tensor.clone() for name, tensor in iter_vl_hf_tensors(model, arch, vision)}
    finally:
        for param, data in saved.items():
            param.data = data


def _padded_batch(examples, vision) -> dict:
    """The examples as one padded [B, S] micro-batch (right padding, M-RoPE positions [3, B, S])."""
    from k15_megatron.models.qwen2_vl import sequence_mrope_positions

    length = max(len(ex["input_ids"]) for ex in examples)
    batch = {key: torch.zeros(len(examples), length, dtype=dtype)
             for key, dtype in (("input_ids", torch.int64), ("labels", torch.int64), ("loss_mask", torch.float32))}
    positions = torch.zeros(3, len(examples), length, dtype=torch.int64)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        for key in batch:
            batch[key][row, :n] = ex[key]
        positions[:, row, :n] = sequence_mrope_positions(ex["input_ids"], ex.get("image_grid_thw"), vision_arch=vision)
    with_images = [ex for ex in examples if "pixel_values" in ex]
    return {**batch, "position_ids": positions,
            "pixel_values": torch.cat([ex["pixel_values"] for ex in with_images]),
            "image_grid_thw": torch.cat([ex["image_grid_thw"] for ex in with_images])}


def _step_case(rank, world_size, hf_dir, data, tp, pp):
    from megatron.core import parallel_state as ps

    from k15_megatron.checkpoint.vl_weights import load_vl_hf_weights
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.data.packing import pack_examples, row_examples
    from k15_megatron.jobs.sft import sft_micro_batches
    from k15_megatron.models.gpt import padded_vocab_size
    from k15_megatron.models.qwen2_vl import build_qwen2_vl_model
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.schedule import forward_backward, packing_multiple
    from k15_megatron.train.step import masked_token_loss, with_step_counts
    from k15_megatron.train.vocab_padding import real_vocab_logits

    parallel = ParallelConfig(tensor=tp, pipeline=pp)
    initialize(parallel, seed=3)
    model_cfg = ModelConfig(hf_path=hf_dir)
    arch, vision = resolve_model_arch(model_cfg), resolve_vision_arch(model_cfg)
    padded = padded_vocab_size(arch.vocab_size, 128, tp)
    assert padded == PADDED_VOCAB
    model = build_qwen2_vl_model(arch, vision, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                                 padded_vocab=padded)
    load_vl_hf_weights(model, hf_dir, arch, vision, padded)
    rows = pack_examples(data.examples, seq_length=512, pad_id=0, images=data.images)
    assert len(rows) == 1
    packed = sft_micro_batches(rows, micro_batch_size=1, multiple=packing_multiple(model), vision=vision)
    out = {}
    for kind, batch in (("packed", packed[0]), ("padded", _padded_batch(row_examples(rows[0]), vision))):
        model.zero_grad()
        with real_vocab_logits([model], arch.vocab_size):
            metrics = forward_backward([model], with_step_counts([batch]), masked_token_loss)
        grads = _grads_as_hf(model, arch, vision)
        loss = padding_grad = None
        if ps.is_pipeline_last_stage():
            loss = float(sum(m["loss_sum"] for m in metrics) / sum(m["num_tokens"] for m in metrics))
            # this rank's output-layer rows past the tokenizer's vocabulary (TP shard r holds rows
            # [r * V_pad/TP, (r + 1) * V_pad/TP))
            grad = model.language_model.output_layer.weight.grad
            first = arch.vocab_size - ps.get_tensor_model_parallel_rank() * grad.shape[0]
            padding_grad = float(grad[max(0, first):].abs().max()) if first < grad.shape[0] else 0.0
        out[kind] = (loss, grads, padding_grad)
    return out


def _transformers_step(hf_dir: str, data) -> tuple[float, dict]:
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    family = AutoConfig.from_pretrained(hf_dir).model_type
    model_class = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = model_class.from_pretrained(hf_dir, dtype=torch.float32)
    count, losses = 0, []
    for (prompt, response), images in zip(data.examples, data.images):
        ids = torch.tensor([prompt + response])
        types = (ids == model.config.image_token_id).int()  # 1 = image token, as the processor marks them
        logits = model(input_ids=ids, mm_token_type_ids=types, **(images or {})).logits[0, :-1]
        token_loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        losses.append(token_loss[len(prompt) - 1:].sum())  # the labels that are response tokens
        count += len(response)
    loss = torch.stack(losses).sum() / count
    loss.backward()
    return float(loss.detach()), {_file_name(name): p.grad.detach().clone() for name, p in model.named_parameters()}


def _file_name(module_name: str) -> str:
    """transformers 5's module name of a parameter -> its name in the saved files (hub names)."""
    for module, hub in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if module_name.startswith(module):
            return hub + module_name[len(module):]
    return module_name


@pytest.mark.distributed
def test_vl_sft_step_packed_mixed_matches_transformers(tiny_vl_dirs, tmp_path):
    data = _sft_set(tiny_vl_dirs["qwen2_vl"], tmp_path)  # both families share the tokenizer and processor
    assert [i is None for i in data.images] == [True, False, False]
    references = {family: _transformers_step(hf_dir, data) for family, hf_dir in tiny_vl_dirs.items()}
    cases = {(family, layout): (_step_case, (tiny_vl_dirs[family], data, tp, pp))
             for family, layout in CASES for tp, pp in [LAYOUTS[layout]]}
    results = run_cases(2, cases, timeout_s=600)
    for (family, layout), per_rank in results.items():
        ref_loss, ref_grads = references[family]
        for kind in ("packed", "padded"):
            loss = per_rank[-1][kind][0]
            assert abs(loss - ref_loss) <= LOSS_TOLERANCE * abs(ref_loss), (family, layout, kind, loss, ref_loss)
            padding = [r[kind][2] for r in per_rank if r[kind][2] is not None]
            assert padding and max(padding) == 0.0, (family, layout, kind, padding)
            grads = {}
            for rank_result in per_rank:
                grads.update(rank_result[kind][1])
            assert set(grads) == set(ref_grads), (family, layout, kind, sorted(set(grads) ^ set(ref_grads))[:5])
            for name, ref in ref_grads.items():
                err = float((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                assert err <= GRAD_TOLERANCE, (family, layout, kind, name, err)
            visual = [n for n in ref_grads if "visual" in n]
            assert visual and all(grads[n].abs().max() > 0 for n in visual)  # the images reached the loss
