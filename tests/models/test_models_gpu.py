"""GPU path: stock Megatron-Core (TE layer specs when importable) on CUDA matches transformers,
and FP8 through Transformer Engine really runs FP8 GEMMs.

Skipped without CUDA (see tests/conftest.py); the FP8 test also needs Transformer Engine and a
GPU of compute capability >= 8.9 and says so when it skips. None of these needs vLLM. Run with
``pytest -m gpu`` (tools/gpu_check.sh does); results are recorded in docs/gpu.md.
"""

import importlib.util

import pytest
import torch
from distributed import run_distributed


def _gpu_worker(rank, world_size, hf_dir):
    from transformers import AutoModelForCausalLM

    from k15_megatron.checkpoint.model_weights import load_hf_weights
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.cpu import megatron as cpu_megatron
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.schedule import forward_logits

    parallel = ParallelConfig(tensor=1)
    initialize(parallel)
    assert not cpu_megatron._APPLIED, "the CPU redirections must never run on a GPU machine"
    arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
    padded = padded_vocab_size(arch.vocab_size, 128, 1)
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                            padded_vocab=padded)
    load_hf_weights(model, hf_dir, arch, padded)
    tokens = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    ours = forward_logits(model, tokens)[..., : arch.vocab_size].float()
    ref_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        ref = ref_model(tokens).logits
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_megatron_on_cuda_matches_transformers(tiny_hf_dirs, family):
    (err,) = run_distributed(_gpu_worker, 1, tiny_hf_dirs[family])
    # TF32 matmuls on Hopper are allowed by default in some stacks; 1e-3 covers them.
    assert err < 1e-3, f"{family}: relative logit error {err:.2e} on CUDA"


def _fp8_worker(rank, world_size, hf_dir):
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.initialize import initialize

    parallel = ParallelConfig(tensor=1)
    initialize(parallel)
    arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="bf16", fp8="hybrid"),
                            padded_vocab=padded_vocab_size(arch.vocab_size, 128, 1))
    tokens = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(64, device=tokens.device).unsqueeze(0).expand(2, -1)
    logits = model(tokens, positions, attention_mask=None)
    logits.float().square().mean().backward()
    # TE modules record whether their last forward ran under fp8_autocast (TE's ``fp8`` flag).
    te_linears = [m for m in model.modules()
                  if type(m).__module__.startswith("megatron.core.extensions.transformer_engine") and hasattr(m, "fp8")]
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
    return len(te_linears), all(m.fp8 for m in te_linears), bool(torch.isfinite(logits).all()), grads_finite


@pytest.mark.gpu
def test_fp8_runs_fp8_gemms_in_te_layers(tiny_hf_dirs):
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("needs Transformer Engine (FP8 exists only in TE layers)")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"compute capability {torch.cuda.get_device_capability()} < (8, 9) has no FP8")
    num_te, all_fp8, logits_finite, grads_finite = run_distributed(_fp8_worker, 1, tiny_hf_dirs["qwen2"])[0]
    assert num_te >= 2 * 4, f"expected the TE layer spec (QKV/MLP TE linears in 4 layers), found {num_te} TE modules"
    assert all_fp8, "a TE layer ran its forward outside fp8_autocast"
    assert logits_finite and grads_finite
