"""Weight sync Megatron TP=2 -> colocated vLLM TP=2: time and peak extra memory, beside a plain copy.

Two processes on gloo (started like every k15 command), Megatron TP=2 and one vLLM TP=2 CPU
engine spanning the same two processes, as ``k15 rl`` runs them, a Qwen2-shaped model of about
250M parameters (float32, about 0.9 GiB; each rank holds half) built from a config with random
weights. Measured in the same run, each the slower of the two ranks, best of ``--repeats``:

* ours: ``ColocatedWeightSync.sync``, the path ``k15 rl`` takes for this layout: Megatron's and
  vLLM's tensor-parallel layouts coincide, so each rank writes its own shards into its vLLM
  parameters (engine/aligned_sync.py: local QKV re-layout, vocabulary padding, vLLM's CPU
  re-packing of each linear layer's weight, reported as its own phase); wall time, and the
  growth of each rank's peak resident memory during it (VmHWM, reset just before through
  /proc/self/clear_refs), as a share of the whole model and of the weights the rank holds;
* baseline: one ``dst.copy_(src)`` of a flat float32 tensor of the bytes the sync wrote into
  this rank's engine (the rank's half of the model), the lower bound for moving them once.

    python tools/bench/weight_sync.py [--hidden 1024 --layers 16 --ffn 2816 --vocab 32000]

The last line is ``RESULT weight_sync ours=<s> baseline=<s> unit=s ratio=<ours / baseline>``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MIB = 1024**2


def _parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=256, help="engine.sync_bucket_mb")
    p.add_argument("--work-dir", default="/tmp/k15_weight_sync_bench", help="where the model folder is written")
    from k15_megatron.jobs.verbosity import add_flag

    add_flag(p)
    return p.parse_args()


def _make_model_folder(out_dir: str, args) -> None:
    from k15_megatron.models.tiny import save_tiny_hf_model

    save_tiny_hf_model(out_dir, "qwen2", hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=max(2, args.hidden // 256), vocab_size=args.vocab,
                       tie_word_embeddings=False, max_position_embeddings=512)


def _model_bytes(model) -> int:
    """Bytes of the whole float32 model: the tensor-parallel shards of both ranks, the replicated
    tensors (norms) once (collective)."""
    import torch

    from k15_megatron.checkpoint.hf_mapping import partition_dim
    from k15_megatron.checkpoint.model_weights import local_named_parameters
    from k15_megatron.parallel.initialize import global_rank

    mine = sum(p.numel() * 4 for n, p in local_named_parameters(model)
               if partition_dim(n) is not None or global_rank() == 0)
    total = torch.tensor([mine], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return int(total)


def _rank_work(args) -> None:
    import torch

    from k15_megatron.config import ParallelConfig
    from k15_megatron.engine.weight_sync import ColocatedWeightSync
    from k15_megatron.parallel.device import host_peak_rss_extra
    from k15_megatron.parallel.initialize import barrier, global_rank
    from sync_common import colocated_model_and_engine, copy_seconds, slowest_rank, sync_rounds

    arch, model, rollout = colocated_model_and_engine(
        os.path.join(args.work_dir, "model"), ParallelConfig(tensor=2, world_size=2),
        lambda folder: _make_model_folder(folder, args))
    local_mib = sum(p.numel() for p in model.parameters()) * 4 / MIB
    model_mib = _model_bytes(model) / MIB
    sync = ColocatedWeightSync(rollout.llm, dtype=torch.float32, bucket_bytes=args.bucket_mb * MIB)

    ours, extra, metrics = sync_rounds(sync, model, arch, repeats=args.repeats, reduce=slowest_rank,
                                       measure=host_peak_rss_extra)
    worst_extra = slowest_rank(max(extra) / MIB)  # the larger of the two ranks' peaks
    packs = slowest_rank(metrics.get("sync_pack_s", float("nan")))
    copies = copy_seconds(metrics["sync_bytes"], repeats=args.repeats, reduce=slowest_rank, barrier=barrier)
    if global_rank() == 0:
        synced = metrics["sync_bytes"] / MIB
        path = ("each rank's shards written in place (TP-aligned)" if metrics["sync_aligned"]
                else "gathered stream through vLLM's reload_weights")
        print(f"model: {arch.num_layers} layers, hidden {arch.hidden_size}, vocabulary {arch.vocab_size}, "
              f"{model_mib:.0f} MiB of float32 weights; this rank holds {local_mib:.0f} MiB (Megatron TP=2), "
              "vLLM TP=2", flush=True)
        print(f"ours: {path}: {synced:.0f} MiB into each rank's engine in {min(ours):.3f} s (best of "
              f"{args.repeats}); peak extra memory {worst_extra:.0f} MiB per rank = {worst_extra / model_mib:.1%} "
              f"of the model, {worst_extra / local_mib:.1%} of the rank's weights", flush=True)
        if metrics["sync_aligned"]:
            print(f"  last round: {ours[-1]:.3f} s, of which vLLM's post-load processing (the CPU GEMM weights "
                  f"re-packed) {packs:.3f} s, the rest (re-layout, in-place copies) about "
                  f"{ours[-1] - packs:.3f} s", flush=True)
        print(f"baseline: one tensor copy of the same bytes in {min(copies):.3f} s", flush=True)
        print(f"RESULT weight_sync ours={min(ours):.4f} baseline={min(copies):.4f} unit=s "
              f"ratio={min(ours) / min(copies):.2f}", flush=True)
    sync.close()
    rollout.shutdown()  # destroys process-wide groups: after the last collective


def main() -> int:
    from sync_common import run_on_two_ranks

    return run_on_two_ranks(_parse_args(), _rank_work)


if __name__ == "__main__":
    sys.exit(main())
