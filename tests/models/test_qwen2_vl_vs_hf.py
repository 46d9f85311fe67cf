"""Qwen2-VL and Qwen2.5-VL built from their HF configs as Megatron-Core modules
(k15_megatron/models/qwen2_vl.py) give transformers' logits with images, and their HF <-> Megatron
mapping round-trips bit-exactly.

Inputs come from transformers' Qwen2VLProcessor (pixel values, image grids, expanded image
tokens); the M-RoPE position ids are k15's own and are checked against transformers'
``get_rope_index``. Prompts: one 56x84 image; two images of different sizes (56x56, 84x112) in
one prompt (for the tiny Qwen2.5-VL the larger one spans 2 x 2 attention windows, one of them
partial). One launch of 2 gloo processes runs, for each family, the layouts TP=1 (DP=2), TP=2 and
PP=2 (the vision tower on the first stage), loading the HF folder into each and streaming it back out,
then the converters behind tools/convert_* and ``k15 export``: HF -> k15 checkpoint at TP=2,
checkpoint -> HF at PP=2, whose files must hold the original tensors bit for bit.
Tolerance: 1e-4 relative to the largest logit (float32).

Gradients: in the same launch each layout also runs one forward and backward of the two-image
prompt through Megatron's schedule, loss = minus the sum of the log-probs of every next token
(k15's vocabulary-parallel log-probs, vocabulary padding excluded); every parameter's gradient,
TP shards gathered and mapped to Hugging Face names by vl_mapping (vision tower and merger
included), must equal transformers' gradient of the same loss (float32) within GRAD_TOLERANCE
of the largest entry of that tensor's gradient (measured: at most 1.8e-6; the smallest tensor's
largest entry is 0.14, so no gradient here is too small for a relative bound).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distributed import run_cases

from k15_megatron.models.tiny_vl import IMAGE_PLACEHOLDER

TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-4
GRAD_PROMPT = "two images"
LAYOUTS = {"TP1": (1, 1), "TP2": (2, 1), "PP2": (1, 2)}
# prompt name -> (text with one IMAGE_PLACEHOLDER per image, image sizes (height, width))
PROMPTS = {
    "one image": (f"<|im_start|>user\nLook: {IMAGE_PLACEHOLDER} what is it?<|im_end|>\n", [(56, 84)]),
    "two images": (f"<|im_start|>user\n{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER} differ?<|im_end|>\n",
                   [(56, 56), (84, 112)]),
}


def _processed(hf_dir: str) -> dict:
    """prompt name -> the processor's tensors (input_ids, pixel_values, image_grid_thw and the
    token types transformers' get_rope_index reads)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(hf_dir)
    rng = np.random.default_rng(5)
    out = {}
    for name, (text, sizes) in PROMPTS.items():
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
        inputs = processor(text=[text], images=images, return_tensors="pt")
        out[name] = {k: inputs[k] for k in ("input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")}
    return out


def _layout_case(rank, world_size, hf_dir, inputs, tp, pp):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from k15_megatron.checkpoint.vl_weights import iter_vl_hf_tensors, load_vl_hf_weights
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.models.gpt import padded_vocab_size
    from k15_megatron.models.qwen2_vl import build_qwen2_vl_model, mrope_position_ids
    from k15_megatron.parallel.device import to_device
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.schedule import forward_logits

    parallel = ParallelConfig(tensor=tp, pipeline=pp)
    initialize(parallel, seed=3)
    arch, vision = resolve_model_arch(ModelConfig(hf_path=hf_dir)), resolve_vision_arch(ModelConfig(hf_path=hf_dir))
    padded = padded_vocab_size(arch.vocab_size, 128, tp)
    model = build_qwen2_vl_model(arch, vision, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                                 padded_vocab=padded)
    load_vl_hf_weights(model, hf_dir, arch, vision, padded)
    out = {"exported": {name: t.clone() for name, t in iter_vl_hf_tensors(model, arch, vision)}}
    for name, batch in inputs.items():
        positions = mrope_position_ids(batch["input_ids"], batch["image_grid_thw"], image_token_id=vision.image_token_id,
                                       vision_start_token_id=vision.vision_start_token_id,
                                       spatial_merge_size=vision.spatial_merge_size)
        images = to_device({"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]})
        logits = forward_logits(model, to_device(batch["input_ids"]), to_device(positions), images=images)
        if logits is not None:
            out[name] = gather_from_tensor_model_parallel_region(logits)[..., : arch.vocab_size].cpu()
        if name == GRAD_PROMPT:
            out["grads"] = _megatron_gradients(model, batch, positions, arch, vision)
    return out


def _megatron_gradients(model, batch, positions, arch, vision) -> dict:
    """HF name -> this stage's gradient of minus the sum of next-token log-probs (TP shards merged)."""
    from megatron.core import parallel_state as ps

    from k15_megatron.checkpoint import vl_mapping
    from k15_megatron.checkpoint.vl_weights import local_named_parameters
    from k15_megatron.rl.logprobs import token_logprobs
    from k15_megatron.train.schedule import forward_backward

    group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    input_ids = batch["input_ids"]
    micro_batch = {"input_ids": input_ids, "position_ids": positions, "pixel_values": batch["pixel_values"],
                   "image_grid_thw": batch["image_grid_thw"], "next_ids": torch.roll(input_ids, -1, dims=1)}

    def loss_fn(mb, logits):
        logprobs = token_logprobs(logits, mb["next_ids"], group=group, vocab_size=arch.vocab_size)
        return -logprobs[:, :-1].sum(), torch.tensor(1, dtype=torch.int, device=logits.device), {}

    model.zero_grad(set_to_none=True)
    forward_backward(model, [micro_batch], loss_fn)
    grads = {}
    for name, param in local_named_parameters(model):
        full = param.grad.detach()
        if group is not None and vl_mapping.partition_dim(name) is not None:
            shards = [torch.empty_like(full) for _ in range(ps.get_tensor_model_parallel_world_size())]
            torch.distributed.all_gather(shards, full.contiguous(), group=group)
            full = vl_mapping.tp_merge(name, shards, vision=vision)
        for hf_name, tensor in vl_mapping.hf_from_megatron(name, full, arch, vision):
            grads[hf_name] = tensor.cpu().clone()
    return grads


def _convert_case(rank, world_size, hf_dir, ckpt_dir):
    from k15_megatron.checkpoint.convert import hf_to_megatron

    return hf_to_megatron(hf_dir, ckpt_dir, tp=2)


def _export_case(rank, world_size, ckpt_dir, out_dir):
    from k15_megatron.checkpoint.convert import megatron_to_hf

    return megatron_to_hf(ckpt_dir, out_dir, pp=2)


def _read_folder(folder: str) -> dict:
    import glob

    from safetensors.torch import load_file

    tensors = {}
    for path in glob.glob(f"{folder}/*.safetensors"):
        tensors.update(load_file(path))
    return tensors


def _hf_model(hf_dir: str):
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    family = AutoConfig.from_pretrained(hf_dir).model_type
    model_class = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    return model_class.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _hf_gradients(hf_dir: str, batch: dict, folder: str) -> dict:
    """HF checkpoint name -> transformers' gradient of minus the sum of next-token log-probs;
    saved through save_pretrained, so the checkpoint names are transformers' own."""
    model = _hf_model(hf_dir)
    logits = model(**batch).logits[0, :-1]
    (-torch.log_softmax(logits, dim=-1).gather(1, batch["input_ids"][0, 1:, None]).sum()).backward()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.grad)
    model.save_pretrained(folder)
    return _read_folder(folder)


def _hf_reference(hf_dir: str, inputs: dict) -> tuple[dict, dict]:
    """(prompt -> transformers' logits, prompt -> transformers' M-RoPE position ids)."""
    model = _hf_model(hf_dir)
    logits, positions = {}, {}
    with torch.no_grad():
        for name, batch in inputs.items():
            logits[name] = model(**batch).logits
            positions[name] = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                         image_grid_thw=batch["image_grid_thw"])[0]
    return logits, positions


def _check_positions(hf_dir: str, inputs: dict, ref_positions: dict) -> None:
    from k15_megatron.config import ModelConfig
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.models.qwen2_vl import mrope_position_ids

    vision = resolve_vision_arch(ModelConfig(hf_path=hf_dir))
    for name, batch in inputs.items():
        ours = mrope_position_ids(batch["input_ids"], batch["image_grid_thw"], image_token_id=vision.image_token_id,
                                  vision_start_token_id=vision.vision_start_token_id,
                                  spatial_merge_size=vision.spatial_merge_size)
        assert torch.equal(ours, ref_positions[name]), (hf_dir, name)


@pytest.mark.distributed
def test_vl_logits_and_round_trip_match_transformers(tiny_vl_dirs, tmp_path):
    inputs = _processed(tiny_vl_dirs["qwen2_vl"])  # the same tokenizer and processor in both folders
    assert [g.tolist() for g in inputs["two images"]["image_grid_thw"]] == [[1, 4, 4], [1, 6, 8]]
    references, ref_grads, cases = {}, {}, {}
    for family, hf_dir in tiny_vl_dirs.items():
        ref_logits, ref_positions = _hf_reference(hf_dir, inputs)
        _check_positions(hf_dir, inputs, ref_positions)
        references[family] = ref_logits
        ref_grads[family] = _hf_gradients(hf_dir, inputs[GRAD_PROMPT], str(tmp_path / family / "grads"))
        for layout, (tp, pp) in LAYOUTS.items():
            cases[(family, layout)] = (_layout_case, (hf_dir, inputs, tp, pp))
        ckpt = str(tmp_path / family / "ckpt")
        cases[(family, "convert")] = (_convert_case, (hf_dir, ckpt))
        cases[(family, "export")] = (_export_case, (ckpt, str(tmp_path / family / "hf")))
    results = run_cases(2, cases, timeout_s=900)

    for family, hf_dir in tiny_vl_dirs.items():
        back = str(tmp_path / family / "hf")
        original, round_trip = _read_folder(hf_dir), _read_folder(back)
        assert set(round_trip) == set(original), family
        assert all(torch.equal(round_trip[name], tensor) for name, tensor in original.items()), family
        with torch.no_grad():
            assert torch.equal(_hf_model(back)(**inputs["two images"]).logits, references[family]["two images"])
        assert _processed(back)["two images"]["input_ids"].equal(inputs["two images"]["input_ids"])  # processor kept
        for layout in LAYOUTS:
            per_rank = results[(family, layout)]
            exported = {}
            for rank_result in per_rank:
                exported.update(rank_result["exported"])
            assert set(exported) == set(original), (family, layout)
            for hf_name, tensor in original.items():
                assert torch.equal(exported[hf_name], tensor), (family, layout, hf_name)
            for name, ref in references[family].items():
                err = (per_rank[-1][name] - ref).abs().max() / ref.abs().max()
                assert err <= TOLERANCE, (family, layout, name, float(err))
            _check_gradients(per_rank, ref_grads[family], label=(family, layout))


def _check_gradients(per_rank: list, reference: dict, *, label) -> None:
    """Every parameter's gradient (the union of the pipeline stages; the same on each TP rank)
    equals transformers' within GRAD_TOLERANCE of its largest entry."""
    ours = {}
    for rank_result in per_rank:
        for name, grad in rank_result["grads"].items():
            if name in ours:  # another TP rank (or a DP replica) of the same stage: the same gradient
                assert torch.equal(ours[name], grad), (label, name)
            ours[name] = grad
    assert set(ours) == set(reference), label
    for name, ref in reference.items():
        err = float((ours[name] - ref).abs().max()) / float(ref.abs().max())
        assert err <= GRAD_TOLERANCE, (label, name, err)
