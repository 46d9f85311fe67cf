"""Megatron-Core models built from HF configs give transformers' logits (TP=2 and PP=2, gloo).

Each family is converted with the library's converter under the tested layout, loaded back from
the distributed checkpoint, and run through Megatron's pipeline schedule; transformers runs the
original folder on the same tokens. Tolerance: 1e-4 relative to the largest logit (float32).
"""

import os

import pytest
import torch
from distributed import run_distributed

TOKENS_SEED = 123


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _worker(rank, world_size, hf_dirs, out_root, tp, pp):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from transformers import AutoModelForCausalLM

    from k15_megatron.checkpoint.convert import hf_to_megatron
    from k15_megatron.checkpoint.dist_ckpt import load_model
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.device import compute_device
    from k15_megatron.train.schedule import forward_logits

    errors = {}
    for family, hf_dir in hf_dirs.items():
        ckpt = os.path.join(out_root, f"{family}_tp{tp}_pp{pp}")
        hf_to_megatron(hf_dir, ckpt, tp=tp, pp=pp)
        arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
        parallel = ParallelConfig(tensor=tp, pipeline=pp)
        model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                                padded_vocab=padded_vocab_size(arch.vocab_size, 128, tp))
        load_model(model, ckpt)
        tokens = torch.randint(0, arch.vocab_size, (2, 48), generator=torch.Generator().manual_seed(TOKENS_SEED))
        logits = forward_logits(model, tokens.to(compute_device()))
        if logits is None:  # not the last pipeline stage
            continue
        ours = gather_from_tensor_model_parallel_region(logits)[..., : arch.vocab_size].cpu()
        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = reference(tokens).logits
        errors[family] = _relative_error(ours, ref)
    return errors


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["TP2", "PP2"])
def test_megatron_logits_match_transformers(tiny_hf_dirs, tmp_path, tp, pp):
    per_rank = run_distributed(_worker, 2, dict(tiny_hf_dirs), str(tmp_path), tp, pp)
    errors = {}
    for rank_errors in per_rank:
        errors.update(rank_errors)
    assert set(errors) == set(tiny_hf_dirs), f"no logits compared for {set(tiny_hf_dirs) - set(errors)}"
    for family, err in errors.items():
        assert err < 1e-4, f"{family} TP={tp} PP={pp}: max relative logit error {err:.2e}"
