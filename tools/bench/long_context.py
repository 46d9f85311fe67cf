"""Peak memory per rank and tokens/s of one long sequence's forward+backward, CP=1 vs CP=2.

For each sequence length and context-parallel size, fresh processes (CP of them, gloo) build a
random Megatron GPTModel with the project's builders (``build_gpt_model`` on the local spec with
:class:`k15_megatron.models.attention.SdpaCoreAttention`, DDP and optimizer by
``build_training_objects``) and run ONE packed micro-batch holding one sequence of that length
through :func:`k15_megatron.train.schedule.forward_backward` with the SFT token loss
(:func:`k15_megatron.train.step.masked_token_loss`): the path ``k15 sft`` and ``k15 rl`` take,
which cuts the sequence into Megatron's 2*CP chunks per rank.

Memory (CPU), as in ``tools/bench/logprobs_memory.py``: after the model and a small warm-up
micro-batch, each rank resets its kernel-kept peak resident set (``/proc/self/clear_refs``),
runs forward+backward once and reads VmHWM; peak extra = VmHWM - RSS before. The table shows
the largest peak extra over the ranks and tokens/s = length / the slowest rank's seconds.

Run: python tools/bench/long_context.py [--lengths 2048,8192,32768 --hidden 256 --layers 2]
(about 10 minutes on 2 cores at the defaults). The last line is the RESULT line: the per-rank
peak extra at CP=2 (ours) vs CP=1 (baseline) at the longest length, unit MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

MIB = 1024 * 1024


def _build(args, cp: int):
    from k15_megatron.config import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.optimizer import build_training_objects

    parallel, precision = ParallelConfig(context=cp), PrecisionConfig(dtype="fp32")
    initialize(parallel, seed=0)
    heads = max(2, args.hidden // 64)
    arch = resolve_model_arch(ModelConfig(
        family="qwen2", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=3 * args.hidden,
        num_attention_heads=heads, num_query_groups=max(1, heads // 2), kv_channels=args.hidden // heads,
        vocab_size=args.vocab, max_position_embeddings=args.length + 64, tie_word_embeddings=True,
        norm_epsilon=1e-6, rope_theta=1e6))
    padded = padded_vocab_size(arch.vocab_size, 128, 1)
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=precision, padded_vocab=padded)
    chunks, _, _ = build_training_objects(model, optim_cfg=OptimConfig(lr=1e-3, clip_grad=0.0),
                                          precision_cfg=precision, num_steps=1)
    return arch, chunks


def _micro_batch(arch, chunks, length: int, seed: int) -> dict:
    import torch

    from k15_megatron.train.packed import pack_sequences
    from k15_megatron.train.schedule import packing_multiple

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, arch.vocab_size, (length + 1,), generator=g)
    seq = {"input_ids": ids[:-1], "labels": ids[1:], "loss_mask": torch.ones(length)}
    return pack_sequences([seq], multiple=packing_multiple(chunks))


def _run_once(chunks, micro) -> None:
    from k15_megatron.train.schedule import forward_backward
    from k15_megatron.train.step import masked_token_loss, with_step_counts

    for chunk in chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    forward_backward(chunks, with_step_counts([micro]), masked_token_loss)


def _worker(args) -> dict:
    import torch

    arch, chunks = _build(args, args.cp)
    _run_once(chunks, _micro_batch(arch, chunks, 64 * args.cp, seed=1))  # warm-up: kernels, buffers
    micro = _micro_batch(arch, chunks, args.length, seed=0)
    from k15_megatron.parallel.device import host_peak_rss_extra

    torch.distributed.barrier()
    start = time.perf_counter()
    extra = host_peak_rss_extra(lambda: _run_once(chunks, micro))
    seconds = time.perf_counter() - start
    return {"peak_extra_mib": extra / MIB, "seconds": seconds}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_point(args, length: int, cp: int) -> dict:
    """Start CP ranks for one (length, CP) point; the largest peak and the slowest time."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    port = str(_free_port())
    procs = []
    for rank in range(cp):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", RANK=str(rank), WORLD_SIZE=str(cp),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(cp), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--cp", str(cp), "--length", str(length),
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate()
        if proc.returncode:
            for other in procs:
                other.kill()
            raise SystemExit(f"length {length} CP={cp} rank {rank} failed:\n{err[-4000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {"peak_extra_mib": max(r["peak_extra_mib"] for r in results),
            "seconds": max(r["seconds"] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="2048,8192,32768", help="comma-separated sequence lengths")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    if any(n % 4 for n in lengths):
        raise SystemExit(f"--lengths {args.lengths}: each must be a multiple of 4 (2 x CP at CP=2)")
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32; one packed sequence "
          "per forward+backward; peak extra = largest over the CP ranks")
    print(f"{'tokens':>8} {'CP':>3} {'peak extra MiB/rank':>20} {'fwd+bwd s':>10} {'tokens/s':>9}")
    table = {}
    for length in lengths:
        for cp in (1, 2):
            r = table[(length, cp)] = _run_point(args, length, cp)
            print(f"{length:>8} {cp:>3} {r['peak_extra_mib']:>20.1f} {r['seconds']:>10.2f} "
                  f"{length / r['seconds']:>9.0f}", flush=True)
    longest = lengths[-1]
    ours, base = table[(longest, 2)]["peak_extra_mib"], table[(longest, 1)]["peak_extra_mib"]
    print(f"RESULT long_context ours={ours:.1f} baseline={base:.1f} unit=MiB ratio={ours / base:.3f}")


if __name__ == "__main__":
    main()
