"""`k15 sft` on a vision-language model with mixed data, from the command line.

One real run (tiny random Qwen2-VL, 2 processes, PP=2 with the vision tower on the first stage,
2 steps of 2 micro-batches): its data file mixes the visual arithmetic task's image records
(``images`` paths relative to the file) with text records. Checked on that one run: exit status
0, a finite loss logged per step, a checkpoint whose hf_assets keep the model's config.json and
processor; then `k15 export` (one process) turns it into a folder that transformers loads as
Qwen2VLForConditionalGeneration, whose vision tower and language model both moved from the
initial weights (the image examples reached the gradient), and whose processor expands an image
as the original does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tooling import REPO_ROOT


def _mixed_data(folder) -> str:
    from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits
    from k15_megatron.data.jsonl import read_jsonl, write_jsonl
    from k15_megatron.data.visual_arithmetic import VisualArithmeticConfig, write_visual_task_files

    task = ArithmeticTaskConfig(num_sft=4, num_train=0, num_eval=0, seed=11)
    visual = read_jsonl(write_visual_task_files(VisualArithmeticConfig(task=task), str(folder))["sft"])
    text = generate_splits(ArithmeticTaskConfig(num_sft=4, num_train=0, num_eval=0, seed=12))["sft"]
    mixed = [record for pair in zip(visual, text) for record in pair]
    path = os.path.join(folder, "mixed.jsonl")
    write_jsonl(path, mixed)
    return path


def _k15(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "K15_STRICT_DEVICE": "1"}
    return subprocess.run([sys.executable, "-m", "k15_megatron.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900, env=env)


def _tensors(folder: str) -> dict:
    import glob

    from safetensors.torch import load_file

    out = {}
    for path in glob.glob(f"{folder}/*.safetensors"):
        out.update(load_file(path))
    return out


@pytest.mark.distributed
def test_k15_sft_trains_a_vl_model_on_mixed_data_and_exports_it(tiny_vl_dirs, tmp_path):
    hf_dir = tiny_vl_dirs["qwen2_vl"]
    data = _mixed_data(tmp_path)
    run_dir = tmp_path / "run"
    overrides = [f"model.hf_path={hf_dir}", f"run_dir={run_dir}", f"data.train_path={data}", "precision.dtype=fp32",
                 "data.seq_length=256", "data.global_batch_size=2", "data.micro_batch_size=1", "optim.train_iters=2",
                 "optim.lr=1e-3", "parallel.world_size=2", "parallel.pipeline=2"]
    recipe = tmp_path / "vl.yaml"
    recipe.write_text("name: vl\n")
    proc = _k15("sft", str(recipe), *overrides)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(run_dir / "metrics.jsonl") as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses), losses
    checkpoint = run_dir / "checkpoints" / "iter_0000002"
    assets = checkpoint / "hf_assets"
    with open(assets / "config.json") as f:
        assert json.load(f)["model_type"] == "qwen2_vl"
    assert (assets / "processor_config.json").exists()

    out = tmp_path / "hf"
    proc = _k15("export", str(checkpoint), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    before, after = _tensors(hf_dir), _tensors(str(out))
    assert set(after) == set(before)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(n.startswith("visual.") for n in moved) and any(n.startswith("model.layers.") for n in moved), moved
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    assert torch.equal(model.state_dict()["lm_head.weight"], after["lm_head.weight"])
    from PIL import Image

    image = Image.new("RGB", (56, 84), "white")
    prompt = "<|vision_start|><|image_pad|><|vision_end|>?"
    ours = AutoProcessor.from_pretrained(str(out))(text=[prompt], images=[image], return_tensors="pt")
    theirs = AutoProcessor.from_pretrained(hf_dir)(text=[prompt], images=[image], return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])

