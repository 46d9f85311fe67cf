"""Weight sync of a mixture-of-experts model under expert parallelism, beside a plain tensor copy.

Two processes on gloo (started like every k15 command), Megatron EP=2 (each rank holds half the
routed experts) and one vLLM TP=2 CPU engine spanning the same two processes, a Qwen3-MoE-shaped
model built from a config with random weights (default ~170M parameters, float32). Measured in
the same run, each the slower of the two ranks, best of ``--repeats``:

* ours: ``ColocatedWeightSync.sync`` (the experts all-gathered from their EP ranks, name
  mapping, streaming in bounded buckets into vLLM's in-place ``reload_weights``, vLLM's CPU
  re-packing of the routed experts);
* baseline: one ``dst.copy_(src)`` of a flat tensor of the bytes the sync streamed into this
  rank's engine, the lower bound for moving the weights once.

    python tools/bench/moe_sync.py [--hidden 512 --layers 8 --experts 32 --moe-ffn 384 --topk 4]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MIB = 1024**2


def _parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--moe-ffn", type=int, default=384, help="each routed expert's SwiGLU width")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default="/tmp/k15_moe_sync_bench", help="where the model folder is written")
    from k15_megatron.jobs.verbosity import add_flag

    add_flag(p)
    return p.parse_args()


def _make_model_folder(out_dir: str, args) -> None:
    from k15_megatron.models.tiny import save_tiny_hf_model

    save_tiny_hf_model(out_dir, "qwen3_moe", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=4,
                       head_dim=64, num_experts=args.experts, num_experts_per_tok=args.topk,
                       moe_intermediate_size=args.moe_ffn, mlp_only_layers=[], max_position_embeddings=512)


def _rank_work(args) -> None:
    import torch

    from k15_megatron.config import ParallelConfig
    from k15_megatron.engine.weight_sync import ColocatedWeightSync
    from k15_megatron.parallel.initialize import barrier, global_rank
    from sync_common import (colocated_model_and_engine, copy_seconds, slowest_rank, stream_seconds,
                             sync_rounds)

    arch, model, rollout = colocated_model_and_engine(
        os.path.join(args.work_dir, "model"), ParallelConfig(expert=2, world_size=2),
        lambda folder: _make_model_folder(folder, args))
    local = sum(p.numel() for p in model.parameters())
    sync = ColocatedWeightSync(rollout.llm, dtype=torch.float32)

    ours, _, metrics = sync_rounds(sync, model, arch, repeats=args.repeats, reduce=slowest_rank)
    # The part that is ours alone: producing the stream (experts gathered over EP, name mapping),
    # with vLLM's loader replaced by a consumer that only touches each tensor.
    streams = stream_seconds(model, arch, repeats=args.repeats, reduce=slowest_rank, barrier=barrier)
    copies = copy_seconds(metrics["sync_bytes"], repeats=args.repeats, reduce=slowest_rank, barrier=barrier)
    if global_rank() == 0:
        synced = metrics["sync_bytes"] / MIB
        print(f"model: {arch.num_moe_experts} routed experts x {arch.num_layers} layers (top-{arch.moe_router_topk}); "
              f"this rank holds {local / 1e6:.0f}M parameters (half the experts), vLLM TP=2", flush=True)
        print(f"ours: sync of {synced:.0f} MiB into each rank's engine in {min(ours):.3f} s "
              f"(best of {args.repeats}; experts gathered over EP=2)", flush=True)
        print(f"  of which producing the stream (ours, without vLLM's reload): {min(streams):.3f} s; the rest is "
              "vLLM's in-place reload (per-expert weight loaders, the CPU experts kernel's re-packing)", flush=True)
        print(f"baseline: one tensor copy of the same bytes in {min(copies):.3f} s", flush=True)
        print(f"RESULT moe_sync ours={min(ours):.4f} baseline={min(copies):.4f} unit=s "
              f"ratio={min(ours) / min(copies):.2f}", flush=True)
    sync.close()
    rollout.shutdown()  # destroys process-wide groups: after the last collective


def main() -> int:
    from sync_common import run_on_two_ranks

    return run_on_two_ranks(_parse_args(), _rank_work)


if __name__ == "__main__":
    sys.exit(main())
