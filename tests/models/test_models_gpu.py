"""GPU path: stock Megatron-Core (TE layer specs when importable) on CUDA matches transformers.

Skipped without CUDA (see tests/conftest.py); run on the lent GPU machine with
``pytest -m gpu``. Results are recorded in docs/gpu.md.
"""

import pytest
import torch
from distributed import run_distributed


def _gpu_worker(rank, world_size, hf_dir):
    from transformers import AutoModelForCausalLM

    from k15_megatron.checkpoint.model_weights import load_hf_weights
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel import cpu_megatron
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
