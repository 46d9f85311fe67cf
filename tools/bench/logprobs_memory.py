"""Peak extra memory and time of token_logprobs (chunked) vs naive full-logits log_softmax.

Both variants compute the same thing on the same inputs: per-token log-probs of the labels from
hidden [S, 1, H] and an output weight [V, H], then backward of their sum to hidden and weight.

- ours:     k15_megatron.rl.logprobs.token_logprobs(hidden, labels, weight=w, chunk_size=C)
- baseline: log_softmax(hidden @ w.T).gather(labels) with autograd (what a trainer does without
            a fused kernel; it holds [S, V] logits, their log_softmax and their gradients)

How memory is measured (CPU): each variant runs in a fresh subprocess. After the inputs exist
and a small warm-up has loaded the kernels, the process resets its kernel-kept peak resident set
size (writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS), runs forward and
backward once, and reads VmHWM from /proc/self/status. Peak extra = VmHWM - RSS before the run:
the most physical memory the computation ever had resident on top of its inputs, measured by the
kernel (every page touched counts, whoever allocated it). glibc is told to mmap allocations
above 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed buffers leave the process at once instead of
being kept in the heap, which would otherwise inflate either side by allocator leftovers.
Gradients of hidden and weight (the same for both) are part of both numbers.

Run: python tools/bench/logprobs_memory.py [--seq 8192 --vocab 32000 --hidden 256 --chunk 1024]
The last line is the RESULT line (unit MiB, ratio = ours / baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _naive(hidden, weight, labels):
    import torch

    logits = hidden.float() @ weight.float().t()
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _ours(hidden, weight, labels, chunk):
    from k15_megatron.rl.logprobs import token_logprobs

    return token_logprobs(hidden, labels, weight=weight, chunk_size=chunk)


def _worker(variant: str, seq: int, vocab: int, hidden_size: int, chunk: int) -> dict:
    import torch

    torch.manual_seed(0)
    run = (lambda h, w, y: _ours(h, w, y, chunk)) if variant == "ours" else _naive
    # warm-up on a small problem so library initialisation is not counted
    hw = torch.randn(64, 1, hidden_size, requires_grad=True)
    ww = torch.randn(128, hidden_size, requires_grad=True)
    run(hw, ww, torch.randint(0, 128, (64, 1))).sum().backward()
    hidden = (torch.randn(seq, 1, hidden_size) * 0.1).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size) * 0.1).requires_grad_(True)
    labels = torch.randint(0, vocab, (seq, 1))
    del hw, ww
    rss_before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "VmHWM (process-lifetime peak: clear_refs not permitted)"
    start = time.perf_counter()
    lp = run(hidden, weight, labels)
    lp.sum().backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {
        "variant": variant, "peak_extra_mib": (peak - rss_before) / 1024, "seconds": seconds,
        "method": method, "lp_sum": float(lp.detach().double().sum()),
        "grad_h_sum": float(hidden.grad.double().abs().sum()),
        "grad_w_sum": float(weight.grad.double().abs().sum()),
    }


def _run_variant(variant: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--seq", str(args.seq),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--worker", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.seq, args.vocab, args.hidden, args.chunk)))
        return
    full = args.seq * args.vocab * 4 / MIB
    print(f"S={args.seq} V={args.vocab} H={args.hidden} chunk={args.chunk}: one [S, V] float32 "
          f"tensor = {full:.0f} MiB, one [chunk, V] = {args.chunk * args.vocab * 4 / MIB:.0f} MiB")
    ours, naive = _run_variant("ours", args), _run_variant("naive", args)
    for r in (ours, naive):
        print(f"{r['variant']:>6}: peak extra {r['peak_extra_mib']:8.1f} MiB, fwd+bwd "
              f"{r['seconds']:6.2f} s  ({r['method']})")
    for key in ("lp_sum", "grad_h_sum", "grad_w_sum"):  # same work: results must agree
        a, b = ours[key], naive[key]
        if abs(a - b) > 1e-4 * max(1.0, abs(b)):
            raise SystemExit(f"variants disagree on {key}: ours {a} vs naive {b}")
    print(f"time ratio ours/naive = {ours['seconds'] / naive['seconds']:.2f}")
    ratio = ours["peak_extra_mib"] / naive["peak_extra_mib"]
    print(f"RESULT logprobs_memory ours={ours['peak_extra_mib']:.1f} "
          f"baseline={naive['peak_extra_mib']:.1f} unit=MiB ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
