"""Session-wide test set-up: markers, the GPU skip rule and shared expensive fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from tooling import run_tool

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# Every process the tests start (distributed ranks, jobs, tools) runs in the strict device mode
# (k15_megatron/parallel/strict_device.py): a host tensor where a GPU run needs a device tensor
# fails the test. The pytest process itself never prepares Megatron, so it is not affected.
os.environ.setdefault("K15_STRICT_DEVICE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ---------------------------------------------------------------------------------------------
# Shared, expensive fixtures (built once per test session)
# ---------------------------------------------------------------------------------------------
FAMILIES = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory):
    """family -> folder of a tiny random HF model (Llama: untied + llama3 RoPE scaling, sharded
    safetensors with an index; Qwen2: tied + QKV bias; Qwen3: untied + QK-norm)."""
    from k15_megatron.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny_hf")
    dirs = {}
    for family in FAMILIES:
        shard = "150KB" if family == "llama" else None
        dirs[family] = save_tiny_hf_model(str(root / family), family, init_std=0.1, max_shard_size=shard)
    return dirs


@pytest.fixture(scope="session")
def tiny_moe_hf_dirs(tmp_path_factory):
    """family -> folder of a tiny random mixture-of-experts HF model (top 2, dense first layer):
    Qwen3-MoE (4 experts, renormalised top-k, QK-norm), Qwen2-MoE (4 experts, gated shared expert)
    and DeepSeek-V3 (8 experts in 2 groups, sigmoid routing with a random score-correction bias,
    multi-latent attention, an ungated shared expert)."""
    from k15_megatron.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny_moe_hf")
    return {family: save_tiny_hf_model(str(root / family), family, init_std=0.1)
            for family in ("qwen3_moe", "qwen2_moe", "deepseek_v3")}


@pytest.fixture(scope="session")
def tiny_vl_dirs(tmp_path_factory):
    """family -> folder of a tiny random vision-language model with its tokenizer and processor
    (k15_megatron.models.tiny_vl): Qwen2-VL and Qwen2.5-VL (window attention in its first vision
    block), 2 vision blocks, 2 language layers, M-RoPE sections [4, 6, 6]."""
    from k15_megatron.models.tiny_vl import FAMILIES, save_tiny_qwen2_vl

    root = tmp_path_factory.mktemp("tiny_vl")
    return {family: save_tiny_qwen2_vl(str(root / family), family=family, init_std=0.1) for family in FAMILIES}


@pytest.fixture(scope="session")
def roundtrip_dirs(tiny_hf_dirs, tmp_path_factory):
    """family -> (k15 checkpoint, re-exported HF folder), made by the command-line tools with
    different layouts on each side: Llama TP=2 -> PP=2, Qwen2 PP=2 -> TP=2, Qwen3 TP=1 -> PP=2."""
    root = tmp_path_factory.mktemp("roundtrip")
    layouts = {"llama": ((2, 1), (1, 2)), "qwen2": ((1, 2), (2, 1)), "qwen3": ((1, 1), (1, 2))}
    dirs = {}
    for family, ((tp_in, pp_in), (tp_out, pp_out)) in layouts.items():
        ckpt, back = str(root / f"{family}_ckpt"), str(root / f"{family}_hf")
        for cmd in (
            ["tools/convert_hf_to_megatron.py", "--hf", tiny_hf_dirs[family], "--out", ckpt,
             "--tp", str(tp_in), "--pp", str(pp_in)],
            ["tools/convert_megatron_to_hf.py", "--ckpt", ckpt, "--out", back,
             "--tp", str(tp_out), "--pp", str(pp_out), "--max-shard-size-mb", "1"],
        ):
            proc = run_tool(*cmd)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
        dirs[family] = (ckpt, back)
    return dirs


@pytest.fixture(scope="session")
def vllm_engine(roundtrip_dirs):
    """THE vLLM (CPU) engine of the test session, on the exported tiny Qwen2 folder.

    One engine per session keeps the suite fast; tests must not change its weights. It carries
    the repeat-stop logits processor, as the engines the jobs build do; it acts only on requests
    that ask for it, so tests of plain generation are unaffected.
    """
    from vllm import LLM

    from k15_megatron.rollout.repeat_stop import REPEAT_STOP_PROCESSOR

    _, hf_dir = roundtrip_dirs["qwen2"]
    # A fixed, small KV cache: vLLM's CPU default sizes it from the whole machine's memory.
    engine = LLM(hf_dir, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                 kv_cache_memory_bytes=256 << 20, logits_processors=[REPEAT_STOP_PROCESSOR])
    yield engine
    del engine
