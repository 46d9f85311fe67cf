"""Peak memory of one RL micro-batch forward+backward on Megatron: the loss `k15 rl` runs vs naive.

Both variants run the same micro-batch (``--rows`` sequences, ``--tokens`` label positions in
all) through a real Megatron GPTModel built by the project's builders (``build_gpt_model``, DDP
and optimizer by ``build_training_objects``, one process), through
:func:`k15_megatron.train.schedule.forward_backward`, with the loss function ``update_policy``
builds (:func:`k15_megatron.train.policy_update.mirror_descent_loss_fn` on
:func:`k15_megatron.train.policy_update.packed_micro_batches`, one packed micro-batch). They differ only in where the token
log-probs come from:

- ours: the model returns hidden states (:func:`k15_megatron.train.logprobs.hidden_state_output`)
  and the loss forms float32 logits ``rl.logprob_chunk_tokens`` tokens at a time
  (:meth:`OutputHead.token_logprobs`), exactly what ``update_policy`` runs;
- naive: the model returns its logits [1, T, V] and the loss takes a plain full-vocabulary
  float32 ``log_softmax`` + ``gather``.

The log-prob sum, the loss and every parameter gradient must agree (checked), so both did the
same work. The architecture is tiny (hidden ``--hidden``, one layer) so that the vocabulary
term dominates, as it does for long responses with a 152k vocabulary; the attention cost, the
same for both, stays small with rows of tokens/rows positions.

How memory is measured (CPU): each variant runs in a fresh subprocess. After the model, its
gradient buffers and the micro-batch exist and one small warm-up micro-batch has loaded the
kernels, the process resets its kernel-kept peak resident set size (writing "5" to
/proc/self/clear_refs resets VmHWM to the current RSS), runs forward and backward once, and
reads VmHWM from /proc/self/status. Peak extra = VmHWM - RSS before the run, measured by the
kernel (every page touched counts, whoever allocated it). glibc is told to mmap allocations
above 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed buffers leave the process at once.

Run: python tools/bench/logprobs_memory.py [--tokens 8192 --rows 8 --vocab 152064 --hidden 64]
(about 14 GiB for the naive side at the defaults). The last line is the RESULT line (unit MiB,
ratio = ours / baseline).
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(args):
    """A one-layer Qwen2-style GPTModel of the project's builders, DDP-wrapped, TP=PP=1."""
    from k15_megatron.config import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.optimizer import build_training_objects

    parallel, precision = ParallelConfig(), PrecisionConfig(dtype="fp32")
    initialize(parallel, seed=0)
    heads = max(1, args.hidden // 32)
    arch = resolve_model_arch(ModelConfig(
        family="qwen2", num_layers=1, hidden_size=args.hidden, ffn_hidden_size=2 * args.hidden,
        num_attention_heads=heads, num_query_groups=heads, kv_channels=args.hidden // heads,
        vocab_size=args.vocab, max_position_embeddings=args.tokens // args.rows + 1, tie_word_embeddings=True,
        norm_epsilon=1e-6, rope_theta=1e6))
    padded = padded_vocab_size(arch.vocab_size, 128, 1)
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=precision, padded_vocab=padded)
    chunks, _, _ = build_training_objects(model, optim_cfg=OptimConfig(lr=1e-3, clip_grad=0.0),
                                          precision_cfg=precision, num_steps=1)
    return arch, model, chunks


def _micro_batch(arch, rows: int, seq: int, seed: int):
    """One RL micro-batch of ``rows`` samples (groups of 2) with ``seq`` label positions each."""
    import torch

    from k15_megatron.rl.batch import RolloutBatch
    from k15_megatron.train.policy_update import packed_micro_batches

    g = torch.Generator().manual_seed(seed)
    t = seq + 1
    ids = torch.randint(0, arch.vocab_size, (rows, t), generator=g)
    response = torch.arange(t).expand(rows, -1) >= 8
    behaviour = torch.where(response, -torch.rand(rows, t, generator=g) * 10, torch.zeros(rows, t))
    batch = RolloutBatch(
        input_ids=ids, attention_mask=torch.ones(rows, t, dtype=torch.bool), response_mask=response,
        loss_mask=response.clone(), behaviour_logprobs=behaviour, segment_index=torch.where(response, 0, -1).int(),
        prompt_lengths=torch.full((rows,), 8), response_lengths=torch.full((rows,), t - 8),
        trajectory_ids=torch.arange(rows), prompt_ids=torch.arange(rows) // 2,
        segment_iterations=torch.zeros(rows, 1, dtype=torch.long),
        segment_policy_versions=torch.zeros(rows, 1, dtype=torch.long), num_segments=torch.ones(rows, dtype=torch.long),
        finish_reasons=["stop"] * rows, group_size=2, rewards=torch.rand(rows, generator=g))
    return packed_micro_batches(batch, behaviour[:, 1:], multiple=1, max_tokens=None, max_groups=rows // 2)


def _naive_token_logprobs(logits, targets, *, vocab_size: int):
    """Full-vocabulary float32 log_softmax of the unpadded vocabulary, then gather."""
    import torch

    return torch.log_softmax(logits.float()[..., :vocab_size], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _run_once(variant: str, arch, chunks, micro, cfg, record: list):
    """One forward+backward of ``micro`` through the schedule with update_policy's loss."""
    import contextlib
    import functools

    from k15_megatron.parallel.device import compute_device
    from k15_megatron.train.logprobs import hidden_state_output
    from k15_megatron.train.policy_update import mirror_descent_loss_fn
    from k15_megatron.train.schedule import forward_backward

    for chunk in chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    context = hidden_state_output(chunks) if variant == "ours" else contextlib.nullcontext()
    with context as head:
        base = (functools.partial(head.token_logprobs, vocab_size=arch.vocab_size, chunk_size=cfg.logprob_chunk_tokens)
                if variant == "ours" else functools.partial(_naive_token_logprobs, vocab_size=arch.vocab_size))

        def token_logprobs(output, targets):
            lp = base(output, targets)
            record.append(float((lp.detach().double() * record_mask[0]).sum()))
            return lp

        record_mask = [micro[0]["loss_mask"].to(compute_device()).double()]
        loss_fn = mirror_descent_loss_fn(cfg, token_logprobs=token_logprobs)
        outputs = forward_backward(chunks, micro, loss_fn)
    return float(outputs[0]["loss_sum"])


def _worker(variant: str, args) -> dict:
    from k15_megatron.config.rl import RLConfig

    arch, model, chunks = _build(args)
    cfg = RLConfig(group_size=2, groups_per_micro_batch=args.rows // 2, tau=0.1,
                   logprob_chunk_tokens=args.chunk or RLConfig().logprob_chunk_tokens)
    _run_once(variant, arch, chunks, _micro_batch(arch, 2, 16, seed=1), cfg, [])  # warm-up
    micro = _micro_batch(arch, args.rows, args.tokens // args.rows, seed=0)
    record: list = []
    rss_before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "VmHWM (process-lifetime peak: clear_refs not permitted)"
    start = time.perf_counter()
    loss = _run_once(variant, arch, chunks, micro, cfg, record)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    grads = {n: float(p.main_grad.double().abs().sum()) for n, p in model.named_parameters()}
    return {"variant": variant, "peak_extra_mib": (peak - rss_before) / 1024, "seconds": seconds, "method": method,
            "chunk": cfg.logprob_chunk_tokens, "lp_sum": record[0], "loss": loss, "grads": grads,
            "padded_vocab": int(model.shared_embedding_or_output_weight().shape[0])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_variant(variant: str, args) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--tokens", str(args.tokens),
           "--rows", str(args.rows), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--chunk", str(args.chunk)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{variant} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_same_values(ours: dict, naive: dict) -> None:
    def close(a, b, rel):
        return abs(a - b) <= rel * max(1.0, abs(b))

    for key in ("lp_sum", "loss"):
        if not close(ours[key], naive[key], 1e-5):
            raise SystemExit(f"variants disagree on {key}: ours {ours[key]} vs naive {naive[key]}")
    for name, value in naive["grads"].items():
        if not close(ours["grads"][name], value, 1e-4):
            raise SystemExit(f"variants disagree on the gradient of {name}: ours {ours['grads'][name]} vs {value}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="label positions in the micro-batch")
    p.add_argument("--rows", type=int, default=8, help="sequences in the micro-batch (even: groups of 2)")
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--chunk", type=int, default=0, help="rl.logprob_chunk_tokens (0: the config default)")
    p.add_argument("--worker", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rows < 2 or args.rows % 2 or args.tokens % args.rows:
        raise SystemExit(f"--rows {args.rows} must be even and divide --tokens {args.tokens}")
    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return
    ours = _run_variant("ours", args)
    v = ours["padded_vocab"]
    print(f"micro-batch: {args.rows} x {args.tokens // args.rows} tokens, vocab {v}, hidden {args.hidden}, "
          f"rl.logprob_chunk_tokens={ours['chunk']}: one [tokens, V] float32 tensor = "
          f"{args.tokens * v * 4 / MIB:.0f} MiB, one [chunk, V] = {ours['chunk'] * v * 4 / MIB:.0f} MiB")
    naive = _run_variant("naive", args)
    for r in (ours, naive):
        print(f"{r['variant']:>6}: peak extra {r['peak_extra_mib']:8.1f} MiB, fwd+bwd {r['seconds']:6.2f} s "
              f"({r['method']})")
    _check_same_values(ours, naive)
    print(f"same values: log-prob sum {ours['lp_sum']:.6g} vs {naive['lp_sum']:.6g}, loss {ours['loss']:.6g} vs "
          f"{naive['loss']:.6g}, {len(naive['grads'])} parameter gradients agree")
    ratio = ours["peak_extra_mib"] / naive["peak_extra_mib"]
    print(f"RESULT logprobs_memory ours={ours['peak_extra_mib']:.1f} baseline={naive['peak_extra_mib']:.1f} "
          f"unit=MiB ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
