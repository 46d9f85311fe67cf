"""Mixture-of-experts models built from HF configs give transformers' logits under expert
parallelism (4 gloo processes, one launch, Megatron's parallel state re-initialised per layout).

Tiny Qwen3-MoE (top-2 of 4 experts, renormalised, QK-norm), Qwen2-MoE (top-2 without
renormalisation, gated shared expert, QKV bias) and DeepSeek-V3 (multi-latent attention, sigmoid
routing with score-correction bias, group-limited top-2 of 8 experts, scaled, ungated shared
expert), each with a dense first layer, loaded from their HF folders straight into the Megatron
model of each layout (every rank reads only its experts) and run through Megatron's pipeline
schedule on the same tokens as transformers:

* EP=2 (DP=4) with the alltoall and the allgather token dispatcher;
* EP=2 x TP=2 (the experts keep the tensor-parallel split: expert tensor parallelism);
* PP=2 x EP=2.

DeepSeek-V3 runs EP=2 and PP=2 x EP=2 only (multi-latent attention supports TP=1 here).

Tolerance: 1e-4 relative to the largest logit (float32; measured about 1e-6). Each rank's
parameter count, outside and inside the routed experts, equals ``k15 plan``'s shard of it.
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed

# name -> (tensor, pipeline, expert, token dispatcher) over 4 processes
LAYOUTS = {
    "EP2": (1, 1, 2, "alltoall"),
    "EP2 allgather": (1, 1, 2, "allgather"),
    "EP2xTP2": (2, 1, 2, "alltoall"),
    "PP2xEP2": (1, 2, 2, "alltoall"),
}
TOLERANCE = 1e-4
# family -> the layouts it runs (all when absent)
FAMILY_LAYOUTS = {"deepseek_v3": ("EP2", "PP2xEP2")}


def _runs(family: str, layout: str) -> bool:
    return layout in FAMILY_LAYOUTS.get(family, LAYOUTS)


def _tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 40), generator=torch.Generator().manual_seed(11))


def _worker(rank, world_size, hf_dirs):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from k15_megatron.checkpoint.model_weights import load_hf_weights
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.device import compute_device
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.schedule import forward_logits

    out = {}
    for name, (tp, pp, ep, dispatcher) in LAYOUTS.items():
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        parallel = ParallelConfig(tensor=tp, pipeline=pp, expert=ep, moe_token_dispatcher_type=dispatcher)
        initialize(parallel, seed=3)
        for family, hf_dir in hf_dirs.items():
            if not _runs(family, name):
                continue
            arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
            padded = padded_vocab_size(arch.vocab_size, 128, tp)
            model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                                    padded_vocab=padded)
            load_hf_weights(model, hf_dir, arch, padded)
            experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
            out[(family, name, "params")] = (ps.get_pipeline_model_parallel_rank(), padded,
                                             sum(p.numel() for p in model.parameters()) - experts, experts)
            logits = forward_logits(model, _tokens(arch.vocab_size).to(compute_device()))
            if logits is not None:  # the last pipeline stage
                out[(family, name)] = gather_from_tensor_model_parallel_region(logits)[..., : arch.vocab_size].cpu()
    return out


def _hf_logits(hf_dir: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(_tokens(model.config.vocab_size)).logits


@pytest.mark.distributed
@pytest.mark.slow
def test_moe_logits_match_transformers_under_expert_parallelism(tiny_moe_hf_dirs):
    per_rank = run_distributed(_worker, 4, tiny_moe_hf_dirs, timeout_s=900)
    for family, hf_dir in tiny_moe_hf_dirs.items():
        reference = _hf_logits(hf_dir)
        for name in filter(lambda layout: _runs(family, layout), LAYOUTS):
            results = [r[(family, name)] for r in per_rank if (family, name) in r]
            assert results, f"{family} {name}: no rank returned logits"
            for ours in results:
                err = ((ours - reference).abs().max() / reference.abs().max()).item()
                assert err < TOLERANCE, f"{family} {name}: logits differ from transformers by {err:.2e} (relative)"
    _check_planned_parameters(per_rank, tiny_moe_hf_dirs)


def _check_planned_parameters(per_rank, hf_dirs):
    """Each rank's parameters (outside and inside the routed experts) equal k15 plan's shard."""
    from k15_megatron.config import ModelConfig, resolve_model_arch
    from k15_megatron.plan.params import stage_layer_counts, stage_layer_ranges, stage_parameters

    for family, hf_dir in hf_dirs.items():
        arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
        for name, (tp, pp, ep, _) in LAYOUTS.items():
            if not _runs(family, name):
                continue
            layers = stage_layer_ranges(stage_layer_counts(num_layers=arch.num_layers, pipeline=pp))
            for r in per_rank:
                stage, padded, dense, experts = r[(family, name, "params")]
                planned = stage_parameters(arch, stage=stage, pipeline=pp, tensor=tp, layers=layers[stage],
                                           padded_vocab=padded, expert=ep)
                assert (planned.dense, planned.experts) == (dense, experts), (family, name, stage)
