"""Weight sync Megatron -> colocated vLLM: time and peak extra memory, beside a plain tensor copy.

One process (Megatron TP=1 on gloo, an in-process vLLM CPU engine), a Qwen2-shaped model of a
few hundred million parameters (default ~270M, float32, ~1 GiB) built from a config with random
weights. Measured in the same run:

* ours: ``ColocatedWeightSync.sync`` (name mapping, fused-layout splitting, vLLM's in-place
  ``reload_weights`` including its CPU weight re-packing), wall time and the growth of the
  process's peak resident memory (VmHWM, reset just before through /proc/self/clear_refs);
* baseline: copying the same number of bytes with one ``dst.copy_(src)`` of a flat tensor, the
  lower bound for moving the weights once.

    python tools/bench/weight_sync.py [--hidden 1024 --layers 16 --ffn 2816 --vocab 32000]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MIB = 1024**2


def _make_model_folder(out_dir: str, args) -> None:
    from k15_megatron.models.tiny import save_tiny_hf_model

    save_tiny_hf_model(out_dir, "qwen2", hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab,
                       tie_word_embeddings=False, max_position_embeddings=512)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch
    from vllm import LLM

    from k15_megatron.config import ParallelConfig
    from k15_megatron.engine.weight_sync import ColocatedWeightSync
    from k15_megatron.parallel.device import host_peak_rss_extra
    from k15_megatron.parallel.initialize import initialize
    from sync_common import build_megatron_model, copy_seconds, stream_seconds, sync_rounds

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "model")
        _make_model_folder(hf_dir, args)
        parallel = ParallelConfig()
        initialize(parallel)
        arch, model = build_megatron_model(hf_dir, parallel)
        num_params = sum(p.numel() for p in model.parameters())
        llm = LLM(hf_dir, dtype="float32", enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.2)
        sync = ColocatedWeightSync(llm, dtype=torch.float32, bucket_bytes=256 * MIB)
        model_mib = num_params * 4 / MIB
        print(f"model: {num_params / 1e6:.0f}M parameters, {model_mib:.0f} MiB float32")

        ours_s, ours_extra, metrics = sync_rounds(sync, model, arch, repeats=args.repeats, measure=host_peak_rss_extra)
        ours_extra = [b / MIB for b in ours_extra]
        sync_mib = metrics["sync_bytes"] / MIB
        # The part that is ours alone: producing the stream (mapping, fused-layout splits), with
        # vLLM's loader replaced by a consumer that only touches each tensor.
        stream_extra = host_peak_rss_extra(lambda: stream_seconds(model, arch, repeats=1)) / MIB
        copy_s = copy_seconds(metrics["sync_bytes"], repeats=args.repeats)
        del sync, llm  # vLLM tears down its own groups; the process group goes with the process

    ours, baseline = min(ours_s), min(copy_s)
    print(f"ours: sync of {sync_mib:.0f} MiB in {ours:.3f} s (best of {args.repeats}), "
          f"peak extra memory {max(ours_extra):.0f} MiB = {max(ours_extra) / model_mib:.1%} of the model")
    print(f"  of which producing the stream (ours, without vLLM's reload): {stream_extra:.0f} MiB; "
          f"the rest is vLLM's in-place reload (layer materialisation and CPU weight re-packing)")
    print(f"baseline: one tensor copy of the same bytes in {baseline:.3f} s")
    print(f"RESULT weight_sync ours={ours:.4f} baseline={baseline:.4f} unit=s ratio={ours / baseline:.2f}")


if __name__ == "__main__":
    main()
