"""``k15 plan CONFIG [key=value ...] [--gpu h100-80gb|h200-141gb|GiB]``: per-GPU memory before
a job is queued.

Loads and validates the config exactly as ``k15 config show`` does (world size from
``parallel.world_size``, else WORLD_SIZE / SLURM_NTASKS), reads the model's config.json, and
prints what one GPU holds in each phase of the job (:mod:`k15_megatron.plan`), the verdict and,
when it does not fit, the smallest change that fits as dotted overrides. No torch, no process
group: it runs in a second on a login node.

The last line is ``PLAN fits=<yes|no> peak_gib=<float> capacity_gib=<float> params=<int>``.
Exit status 0 when it fits, 1 when it does not, 2 for an invalid config or GPU name.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from k15_megatron.config.env import resolve_world_size
from k15_megatron.config.loader import load_config
from k15_megatron.config.model_arch import resolve_model_arch
from k15_megatron.config.moe_arch import moe_layer_indices
from k15_megatron.jobs.help_text import config_keys_epilog, description, details
from k15_megatron.plan import activations
from k15_megatron.plan.budget import GIB, MemoryPlan, plan_memory
from k15_megatron.plan.gpus import gpu_capacity
from k15_megatron.plan.layout import layout_from_config
from k15_megatron.plan.verdict import smallest_change

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_INVALID = 0, 1, 2
HELP_KEYS = ("parallel", "precision.dtype", "precision.grad_reduce_in_fp32", "optim.use_distributed_optimizer",
             "rl.group_size", "rl.groups_per_micro_batch", "rl.logprob_chunk_tokens", "rl.reset_optimizer",
             "rollout.tensor_parallel_size", "rollout.max_model_len", "rollout.gpu_memory_utilization",
             "engine.offload_grad_buffers", "engine.offload_optimizer_states", "data.micro_batch_size",
             "data.seq_length")
"""The config keys the plan reads, listed by ``k15 plan --help``."""


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:8.2f}"


def format_plan(plan: MemoryPlan, *, arch, gpu: str, kernels) -> List[str]:
    """The readable table (without the verdict and the PLAN line)."""
    lay = plan.layout
    lines = [
        f"model: {arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads} heads / {arch.num_query_groups} KV heads, "
        f"{plan.num_params:,} parameters"
        + (f", {arch.num_moe_experts} experts (top {arch.moe_router_topk}) on {len(moe_layer_indices(arch))} "
           "MoE layers" if arch.is_moe else ""),
        f"layout: world {lay.world} = TP {lay.tensor} x PP {lay.pipeline} x CP {lay.context} x "
        f"DP {lay.data}" + (f", EP {lay.expert} (expert DP {lay.expert_data})" if lay.expert > 1 else "")
        + f"; sequence parallel {'on' if lay.sequence_parallel else 'off'}, "
        f"distributed optimizer {'on' if lay.distributed_optimizer else 'off'}, "
        f"recompute {lay.recompute}, {lay.dtype}",
        f"layers: {kernels.name}",
        f"micro-batch: {plan.micro_batch_tokens:,} tokens, {plan.local_tokens:,} per CP rank; "
        f"activations per layer without recompute: {plan.layer_activation_bytes / GIB:.2f} GiB",
        f"GPU: {gpu}, {plan.capacity / GIB:.2f} GiB",
        "",
    ]
    for phase in plan.phases:
        lines.append(f"{phase.name:<34}{'GiB':>8}")
        for item in phase.lines:
            lines.append(f"  {item.name:<32}{_gib(item.num_bytes)}  {item.note}".rstrip())
        lines.append(f"  {'total':<32}{_gib(phase.total)}")
    lines.append(f"  {'runtime reserve (assumed)':<32}{_gib(plan.reserve)}  CUDA context, NCCL, fragmentation")
    r = plan.rollout
    if r is not None:
        lines.append(f"vLLM share: weights {r.weights / GIB:.2f} GiB, step activations + sampler + "
                     f"graphs {r.overhead / GIB:.2f} GiB, KV cache {max(r.kv_cache, 0) / GIB:.2f} GiB "
                     f"= {r.kv_tokens:,} tokens ({r.kv_bytes_per_token:,} B/token) = "
                     f"{r.full_length_sequences} sequence(s) of {r.max_model_len:,} tokens")
    return lines


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="k15 plan", description=description(__doc__),
        epilog=details(__doc__) + "\n\n" + config_keys_epilog(HELP_KEYS),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", metavar="CONFIG", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--gpu", default="h100-80gb",
                        help="h100-80gb (default) | h200-141gb | a size in GiB")
    parser.add_argument("--job", choices=("rl", "sft"), default="rl",
                        help="rl (default: trainer + colocated vLLM) | sft (trainer only)")
    parser.add_argument("--no-te", action="store_true",
                        help="count Megatron-Core's local layers (no Transformer Engine on the GPUs)")
    args, rest = parser.parse_known_args(None if argv is None else list(argv))
    unknown = [item for item in rest if item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + rest
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry for ``k15 plan``; returns the exit status (module docstring)."""
    args = _parse(argv)
    try:
        capacity = gpu_capacity(args.gpu)
        # The plan is for the target cluster's stack: Transformer Engine unless --no-te.
        cfg = load_config(args.config, args.overrides, te_available=lambda: not args.no_te)
        arch = resolve_model_arch(cfg.model)
        world, _ = resolve_world_size(cfg.parallel.world_size)
        layout = layout_from_config(cfg, world_size=world)
    except ValueError as e:  # ConfigError, architecture and GPU errors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    kernels = activations.LOCAL if args.no_te else activations.TE

    def planner(c, lay):
        return plan_memory(c, arch, lay, capacity=capacity, job=args.job, kernels=kernels)

    plan = planner(cfg, layout)
    print("\n".join(format_plan(plan, arch=arch, gpu=args.gpu, kernels=kernels)))
    if plan.fits:
        print(f"verdict: fits; peak {plan.peak / GIB:.2f} GiB of {capacity / GIB:.2f} GiB "
              f"({(capacity - plan.peak) / GIB:.2f} GiB to spare)")
    else:
        print("verdict: does not fit: " + "; ".join(plan.problems))
        change = smallest_change(cfg, layout, planner, rl=args.job == "rl")
        print("smallest change that fits: " + (" ".join(change) if change else
                                               "none found (more GPUs, a smaller model or shorter sequences)"))
    print(f"PLAN fits={'yes' if plan.fits else 'no'} peak_gib={plan.peak / GIB:.2f} "
          f"capacity_gib={capacity / GIB:.2f} params={plan.num_params}")
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT
