"""``k15 verify``: Megatron's logits under a layout against transformers', through the real CLI.

The multi-process tests start ``k15 verify`` as a user would (its own ranks, no torchrun) on tiny
random models (hidden 64, 2 layers) whose weights are large enough (std 0.3) that logits spread
over about +-10: a wrong RoPE position or a lost context token changes them by 1-10, far above
the 1e-4 float32 tolerance. Each start checks three layouts in the same processes.
The pieces that combine sharded results are checked in one process against whole tensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from tooling import REPO_ROOT

LAYOUTS = ("parallel.context=2", "parallel.tensor=2 parallel.context=2", "parallel.pipeline=2 parallel.context=2")
VERIFY_LINE = re.compile(r"^VERIFY max_abs=(\S+) mean_abs=(\S+) greedy_agree=(\S+) tolerance=(\S+)$")
LAYOUT_LINE = re.compile(r"^layout (.+?): max_abs=(\S+) mean_abs=(\S+) greedy_agree=(\d+)/(\d+) \((within|PAST) ")


@pytest.fixture(scope="module")
def verify_models(tmp_path_factory):
    """family -> folder of a tiny model (hidden 64, 2 layers, 16k+ context)."""
    from k15_megatron.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("verify_hf")
    return {family: save_tiny_hf_model(str(root / family), family, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=32768, init_std=0.3)
            for family in ("llama", "qwen2", "qwen3")}


def k15_verify(*args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, float]:
    env = {"K15_STRICT_DEVICE": "1", **os.environ}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "k15_megatron.cli", "verify", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
    return done, time.monotonic() - start


def parse(done: subprocess.CompletedProcess) -> tuple[list, tuple]:
    """(layout lines as (label, max_abs, mean_abs, agree, tokens, verdict), the VERIFY numbers)."""
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    assert "error" not in done.stderr, done.stderr[-3000:]  # a verdict is not an error of the ranks
    final = VERIFY_LINE.match(lines[-1])
    assert final, f"last line is not the VERIFY line: {lines[-1]!r}\n{done.stderr[-3000:]}"
    layouts = [m.groups() for m in map(LAYOUT_LINE.match, lines) if m]
    return layouts, tuple(float(x) for x in final.groups())


# --- end to end: every family, three layouts per start ---------------------------------------


TEXTS = ("What is 12 + 30? The answer is 42, since 12 + 30 = 42 and nothing else; check: 42 - 30 = 12.",
         "a shorter line, 1 2 3", "x")
FP32_LABELS = ("TP=1 PP=1 CP=2 DP=2 fp32", "TP=2 PP=1 CP=2 DP=1 fp32", "TP=1 PP=2 CP=2 DP=1 fp32")
STARTS = {
    # family: (extra arguments, expected layout lines)
    "llama": (["--seq-len", "96", "--num-sequences", "4", "--layout", "parallel.context=2 precision.dtype=bf16"],
              [f"{label} packed" for label in FP32_LABELS] + ["TP=1 PP=1 CP=2 DP=2 bf16 packed"]),
    "qwen3": ([a for text in TEXTS for a in ("--text", text)] + ["--packed", "--padded"],
              [f"{label} {kind}" for label in FP32_LABELS for kind in ("packed", "padded")]),
}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(STARTS))
def test_verify_matches_transformers_under_cp_tp_pp(verify_models, family):
    """CP=2, TP=2 x CP=2, PP=2 x CP=2 (4 processes, one start) on one batch of sequences of mixed
    lengths: within 1e-4 and the same greedy tokens. Llama: 4 random sequences (the longest 96
    tokens), packed, and a bf16 layout, reported past the tolerance (exit status 1); Qwen3: three
    texts of 92, 21 and 1 tokens, packed and padded. (Qwen2's logits under a layout are checked
    against transformers in tests/models/test_rope_scaling_vs_hf.py and through vLLM in
    tests/engine/test_hybrid_engine.py.)"""
    extra, labels = STARTS[family]
    done, seconds = k15_verify(verify_models[family], *[a for layout in LAYOUTS for a in ("--layout", layout)],
                               *extra)
    print(f"{family}: {seconds:.1f} s")
    rows, (max_abs, _, agree, tolerance) = parse(done)
    assert tolerance == 1e-4
    assert [row[0] for row in rows] == labels, done.stdout
    num_tokens = sum(len(t) for t in TEXTS) if family == "qwen3" else None
    for label, row_max, row_mean, row_agree, row_tokens, verdict in rows:
        if "bf16" in label:
            assert verdict == "PAST" and float(row_max) > 1e-2, rows  # bf16 really differs from float32
            continue
        assert verdict == "within" and float(row_max) < 1e-4, rows
        assert 0 < float(row_mean) <= float(row_max)
        assert row_agree == row_tokens  # every token's greedy token is transformers'
        if num_tokens is not None:  # one token per character; DP=2 replicas each compare all
            assert int(row_tokens) == num_tokens * (2 if "DP=2" in label else 1)
    if family == "llama":
        assert done.returncode == 1, done.stderr[-3000:]
        assert max_abs > 1e-2 and agree < 1.0
    else:
        assert done.returncode == 0, done.stderr[-3000:]
        assert max_abs < 1e-4 and agree == 1.0


@pytest.mark.distributed
@pytest.mark.slow
def test_verify_16k_sequence_under_cp2(verify_models):
    """One sequence of 16384 tokens and one shorter, packed, CP=2 (2 processes)."""
    done, seconds = k15_verify(verify_models["qwen3"], "--seq-len", "16384", "--num-sequences", "2",
                               "parallel.context=2")
    print(f"16k: {seconds:.1f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    rows, (max_abs, _, agree, _) = parse(done)
    assert rows[0][0] == "TP=1 PP=1 CP=2 DP=1 fp32 packed"
    assert int(rows[0][4]) > 16384  # both sequences' tokens were compared
    assert max_abs < 1e-4 and agree == 1.0


MOE_LAYOUTS = {
    "parallel.expert=2 parallel.tensor=2": "TP=2 PP=1 CP=1 EP=2 (alltoall) DP=2 fp32 packed",
    "parallel.expert=2 parallel.pipeline=2": "TP=1 PP=2 CP=1 EP=2 (alltoall) DP=2 fp32 packed",
    "parallel.expert=2 parallel.context=2": "TP=1 PP=1 CP=2 EP=2 (alltoall) DP=2 fp32 packed",
    "parallel.expert=2 parallel.moe_token_dispatcher_type=allgather": "TP=1 PP=1 CP=1 EP=2 (allgather) DP=4 fp32 packed",
}


@pytest.mark.distributed
@pytest.mark.slow
def test_verify_moe_under_expert_parallelism(tiny_moe_hf_dirs):
    """A Qwen2-MoE (gated shared expert, dense first layer) under EP=2 with TP=2 (expert tensor
    parallelism), with PP=2, with CP=2, and with the allgather token dispatcher: 4 processes, one start (the
    process count is the largest layout's: EP adds the data-parallel replicas it needs)."""
    done, seconds = k15_verify(tiny_moe_hf_dirs["qwen2_moe"], "--seq-len", "64", "--num-sequences", "3",
                               *[a for layout in MOE_LAYOUTS for a in ("--layout", layout)])
    print(f"moe: {seconds:.1f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    rows, (max_abs, _, agree, _) = parse(done)
    assert [row[0] for row in rows] == list(MOE_LAYOUTS.values()), done.stdout
    for label, row_max, row_mean, row_agree, row_tokens, verdict in rows:
        assert verdict == "within" and 0 < float(row_mean) <= float(row_max) < 1e-4, rows
        assert row_agree == row_tokens
    assert max_abs < 1e-4 and agree == 1.0


# --- bad input: status 2 before any process starts --------------------------------------------


def test_verify_refuses_bad_input_naming_it(verify_models, tmp_path, capsys):
    """Status 2 and one error line naming the culprit, from the checks that run before any
    process starts (in this process: no rank could start unnoticed, the checks return first)."""
    from k15_megatron.jobs.verify import main

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(verify_models["qwen2"], gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (gpt2 / "config.json").write_text(json.dumps(config))
    qwen2 = verify_models["qwen2"]
    cases = [
        ([str(gpt2)], "model_type 'gpt2' is not supported"),
        ([qwen2, "parallel.tensor=3"], "not divisible by parallel.tensor=3"),
        ([qwen2, "--layout", "parallel.context=2", "--layout", "parallel.pipeline=3"],
         "--layout 'parallel.context=2': invalid configuration"),
        ([qwen2, "--seq-len", "40000"], "--seq-len=40000 is longer than the model's context"),
        ([qwen2, "parallel.tensr=2"], "unknown config key 'parallel.tensr'"),
        ([qwen2, "--layout", "parallel.world_size=2", "--layout", "parallel.world_size=4"],
         "give every layout the same parallel.world_size"),
        ([qwen2, "--tolerance", "0"], "--tolerance=0.0"),
    ]
    for args, culprit in cases:
        assert main(args) == 2, args
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and culprit in err, (args, err)
        assert "VERIFY" not in out


def test_verify_cli_refuses_a_missing_folder(tmp_path):
    done, _ = k15_verify(str(tmp_path / "missing"), "parallel.context=2")
    assert done.returncode == 2
    missing = tmp_path / "missing"
    assert done.stderr.strip() == f"error: {missing}: no such folder (HF_DIR must be a Hugging Face model folder)"
    assert done.stdout == ""


# --- the pieces, against whole tensors ---------------------------------------------------------


def test_sharded_comparison_adds_up_to_the_whole():
    """Partial statistics of 2 TP vocabulary shards x 2 CP token shares (Megatron's layout,
    vocabulary padded from 50 to 64 with huge padding logits) equal those of the whole tensors,
    and the greedy token of the shards is the whole row's argmax over the real vocabulary."""
    from k15_megatron.jobs.logit_compare import LogitStats, compare_shard, real_vocab_columns, vocab_parallel_argmax
    from k15_megatron.parallel.context import cp_rank_token_index

    g = torch.Generator().manual_seed(0)
    vocab, padded, tokens = 50, 64, 16
    reference = torch.randn(tokens, vocab, generator=g)
    ours = torch.cat([reference + 1e-3 * torch.randn(tokens, vocab, generator=g),
                      torch.full((tokens, padded - vocab), 1e6)], dim=1)
    whole = (ours[:, :vocab].double() - reference.double()).abs()
    total = LogitStats()
    for cp_rank in range(2):
        rows = cp_rank_token_index([tokens], cp_size=2, cp_rank=cp_rank)
        for tp_rank in range(2):
            shard = ours[rows, tp_rank * 32:(tp_rank + 1) * 32]
            start, num_real = real_vocab_columns(vocab_local=32, tp_rank=tp_rank, vocab_size=vocab)
            total.add(compare_shard(shard, reference[rows], vocab_start=start, num_real=num_real))
    assert total.num_values == tokens * vocab
    assert total.max_abs == pytest.approx(float(whole.max()), rel=1e-12)
    assert total.mean_abs == pytest.approx(float(whole.mean()), rel=1e-12)
    start, num_real = real_vocab_columns(vocab_local=padded, tp_rank=0, vocab_size=vocab)
    greedy = vocab_parallel_argmax(ours, vocab_start=start, num_real=num_real)
    assert torch.equal(greedy, ours[:, :vocab].argmax(-1))  # the padding's 1e6 never wins


def test_nan_counts_as_past_any_tolerance():
    from k15_megatron.jobs.logit_compare import compare_shard
    from k15_megatron.jobs.verify import verdict_line

    ours = torch.zeros(2, 4)
    ours[1, 2] = float("nan")
    stats = compare_shard(ours, torch.zeros(2, 4), vocab_start=0, num_real=4)
    stats.num_agree, stats.num_tokens = 2, 2
    line, status = verdict_line([("x", stats)], 1e-4)
    assert status == 1 and line.startswith("VERIFY max_abs=inf")


def test_random_sequences_mix_lengths_and_repeat_with_the_seed():
    from k15_megatron.jobs.verify_inputs import random_sequences

    seqs = random_sequences(num_sequences=6, seq_len=100, vocab_size=50, seed=3)
    again = random_sequences(num_sequences=6, seq_len=100, vocab_size=50, seed=3)
    lengths = [len(s) for s in seqs]
    assert lengths[0] == 100 and all(1 <= n <= 100 for n in lengths) and len(set(lengths)) > 2
    assert all(torch.equal(a, b) for a, b in zip(seqs, again))
    assert all(int(s.max()) < 50 for s in seqs)


def test_padded_batch_marks_padding():
    from k15_megatron.jobs.verify_inputs import padded_batch

    batch = padded_batch([torch.tensor([5, 6, 7]), torch.tensor([8])], multiple=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, -1], [1, -1, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 2


# --- vision-language models: image prompts ------------------------------------------------------

VL_LAYOUTS = {"parallel.tensor=2": "TP=2 PP=1 CP=1 DP=1 fp32 padded",
              "parallel.pipeline=2": "TP=1 PP=2 CP=1 DP=1 fp32 padded"}
PROMPTS_LINE = re.compile(r"^prompts: (.+)$")


@pytest.mark.distributed
def test_verify_vision_language_model_with_images(tiny_vl_dirs):
    """Qwen2.5-VL (window attention in one vision block) under TP=2 and PP=2, one start of 2
    processes: 3 prompts with 3, 2 and 1 random images of different sizes, against transformers
    with the same images; within 1e-4 and the same greedy tokens."""
    done, seconds = k15_verify(tiny_vl_dirs["qwen2_5_vl"], "--images", "3", "--num-sequences", "3", "--seq-len", "40",
                               *[a for layout in VL_LAYOUTS for a in ("--layout", layout)])
    print(f"vision-language: {seconds:.1f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    rows, (max_abs, _, agree, _) = parse(done)
    assert [row[0] for row in rows] == list(VL_LAYOUTS.values()), done.stdout
    prompts = [m.group(1) for m in map(PROMPTS_LINE.match, done.stdout.splitlines()) if m]
    assert len(prompts) == 1, done.stdout
    grids = [re.findall(r"\[(\d+), (\d+), (\d+)\]", part) for part in prompts[0].split("; ")]
    assert [len(g) for g in grids] == [3, 2, 1], prompts  # images per prompt
    assert len({g for prompt in grids for g in prompt}) > 1, prompts  # images of different sizes
    tokens = sum(int(part.split(" tokens")[0]) for part in prompts[0].split("; "))
    for label, row_max, row_mean, row_agree, row_tokens, verdict in rows:
        assert verdict == "within" and 0 < float(row_mean) <= float(row_max) < 1e-4, rows
        assert row_agree == row_tokens and int(row_tokens) == tokens  # every token of every prompt compared
    assert max_abs < 1e-4 and agree == 1.0


def test_verify_refuses_vision_language_input_naming_it(tiny_vl_dirs, verify_models, capsys):
    """Status 2 before any process starts: context or sequence parallelism, --packed and --text for a
    vision-language model; --images for a text model."""
    from k15_megatron.jobs.verify import main

    vl = tiny_vl_dirs["qwen2_vl"]
    cases = [
        ([vl, "parallel.context=2"], "parallel.context=2: a vision-language model (qwen2_vl) runs without context"),
        ([vl, "--layout", "parallel.tensor=2 parallel.sequence_parallel=true"],
         "parallel.sequence_parallel=true: not supported with a vision-language model"),
        ([vl, "--packed"], "--packed: a vision-language model (qwen2_vl) is checked with one padded"),
        ([vl, "--text", "hello"], "--text: not supported for a vision-language model"),
        ([vl, "--images", "-1"], "--images=-1: must be >= 0"),
        ([verify_models["qwen2"], "--images", "1"], "is a text model; images need a Qwen2-VL"),
    ]
    for args, culprit in cases:
        assert main(args) == 2, args
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and culprit in err, (args, err)
        assert "VERIFY" not in out


def test_image_prompts_carry_images_of_different_sizes(tiny_vl_dirs):
    """Prompt i holds images - (i mod images) images, each as vision_start, grid/merge^2 image
    tokens, vision_end, with its patches in pixel_values; the text never holds a vision token;
    the same seed gives the same prompts, another seed others."""
    from k15_megatron.config import ModelConfig, resolve_model_arch
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.jobs.verify_vision import image_prompts, vision_batch, vision_token_ids

    hf_dir = tiny_vl_dirs["qwen2_vl"]
    model = ModelConfig(hf_path=hf_dir)
    vision, vocab = resolve_vision_arch(model), resolve_model_arch(model).vocab_size
    ids = vision_token_ids(hf_dir)

    def make(seed):
        return image_prompts(hf_dir, num_prompts=4, text_len=30, images=2, vocab_size=vocab, vision=vision, seed=seed)

    sequences, images = make(7)
    assert [len(i["image_grid_thw"]) for i in images] == [2, 1, 2, 1]
    sizes = set()
    for seq, inputs in zip(sequences, images):
        grids = inputs["image_grid_thw"]
        sizes |= {tuple(g) for g in grids.tolist()}
        assert inputs["pixel_values"].shape == (int(grids.prod(dim=1).sum()), vision.patch_input_size)
        assert int((seq == ids["image_token_id"]).sum()) == int(grids.prod(dim=1).sum()) // 4
        for key in ("vision_start_token_id", "vision_end_token_id"):
            assert int((seq == ids[key]).sum()) == len(grids)
        assert int((seq == ids["video_token_id"]).sum()) == 0 and int(seq.max()) < vocab
    assert len(sequences[0]) == 30 + sum(1 + int(g.prod()) // 4 + 1 for g in images[0]["image_grid_thw"])
    assert len(sizes) > 1
    again, other = make(7), make(8)
    assert all(torch.equal(a, b) for a, b in zip(sequences, again[0]))
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(images, again[1]))
    assert not all(torch.equal(a["pixel_values"][:5], b["pixel_values"][:5]) for a, b in zip(images, other[1]))
    batch = vision_batch(sequences, images, vision=vision)
    assert batch["position_ids"].shape == (3, 4, max(len(s) for s in sequences))
    assert batch["pixel_values"].shape[0] == sum(i["pixel_values"].shape[0] for i in images)
    assert batch["token_index"][1, :5].tolist() == [0, 1, 2, 3, 4]
