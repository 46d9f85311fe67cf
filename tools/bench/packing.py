"""RL update time on a long-tailed length mix: packed micro-batches vs padded rows, same batch.

The update. :func:`k15_megatron.train.policy_update.update_policy`, what ``k15 rl`` runs each
iteration (reference log-prob recompute, then the optimizer steps of the mirror-descent loss),
on a trainer built by :func:`k15_megatron.train.setup.build_trainer` from the config keys given
below, one process (CPU, float32, Megatron-Core local layers with the SDPA core attention).

The batch. --groups groups of k = --group-size responses after a --prompt-tokens prompt; most
response lengths uniform in [--short-min, --short-max], --long responses of --long-length
tokens (the long tail of chains of thought). Random tokens, rewards and behaviour log-probs:
the time does not depend on them.

- ours:     the batch as ``k15 rl`` builds it (right padding after each response) through
            the packed path: each response's prompt + response tokens only, whole groups per
            micro-batch up to data.micro_batch_tokens = --budget tokens.
- baseline: the same batch with every row as long as the longest (attention_mask all ones),
            the work a padded [B, T] batch costs, through the same code and the same budget
            (a group of padded rows above the budget runs alone). Under causal attention the
            padding after a response changes none of its log-probs, so both compute the same
            update (tests/train/test_policy_update_cp.py checks that).

The two are run alternately --repeats times each after one warm-up of each (so load changes on
a shared machine hit both alike); reported: the median wall time of one update_policy call,
the tokens the model ran (``train/packed_tokens``) and the micro-batches per step.

Run: python tools/bench/packing.py [--groups 8 --group-size 4 --long 2 --long-length 4096]
The last line is the RESULT line (unit s per update, ratio = ours / baseline; < 1 is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time


def _batch(args, vocab: int):
    """The RolloutBatch of the module docstring (long responses spread over the groups)."""
    import torch

    from k15_megatron.rl.batch import RolloutBatch

    g = torch.Generator().manual_seed(0)
    b = args.groups * args.group_size
    lengths = torch.randint(args.short_min, args.short_max + 1, (b,), generator=g)
    for i in range(args.long):
        lengths[(i * b) // max(args.long, 1)] = args.long_length
    t = args.prompt_tokens + int(lengths.max())
    pos = torch.arange(t)
    attention = pos < (args.prompt_tokens + lengths)[:, None]
    response = attention & (pos >= args.prompt_tokens)
    ids = torch.where(attention, torch.randint(3, vocab, (b, t), generator=g), torch.zeros(b, t, dtype=torch.long))
    behaviour = torch.where(response, -torch.rand(b, t, generator=g) * 5, torch.zeros(b, t))
    return RolloutBatch(
        input_ids=ids, attention_mask=attention, response_mask=response, loss_mask=response.clone(),
        behaviour_logprobs=behaviour, segment_index=torch.where(response, 0, -1).int(),
        prompt_lengths=torch.full((b,), args.prompt_tokens), response_lengths=lengths, trajectory_ids=torch.arange(b),
        prompt_ids=torch.arange(b) // args.group_size, segment_iterations=torch.zeros(b, 1, dtype=torch.long),
        segment_policy_versions=torch.zeros(b, 1, dtype=torch.long), num_segments=torch.ones(b, dtype=torch.long),
        finish_reasons=["stop"] * b, group_size=args.group_size, rewards=(torch.rand(b, generator=g) > 0.5).float())


def _trainer(args, work: str):
    from k15_megatron.config import load_config
    from k15_megatron.models.tiny import save_tiny_hf_model
    from k15_megatron.train.setup import build_trainer

    longest = max(args.long_length, args.short_max)
    model_dir = save_tiny_hf_model(os.path.join(work, "model"), "qwen2", hidden_size=args.hidden,
                                   intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                   num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=max(1, args.hidden // 128),
                                   max_position_embeddings=2 * (args.prompt_tokens + longest))
    overrides = [f"model.hf_path={model_dir}", f"run_dir={work}/run", "precision.dtype=fp32",
                 f"data.micro_batch_tokens={args.budget}", f"rl.group_size={args.group_size}",
                 f"rl.groups_per_micro_batch={args.groups}", "rl.updates_per_iteration=1",
                 f"rl.prompts_per_iteration={args.groups}"]
    cfg = load_config(None, overrides)
    return cfg, build_trainer(cfg, num_optimizer_steps=4 * args.repeats + 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--short-min", type=int, default=100)
    ap.add_argument("--short-max", type=int, default=200)
    ap.add_argument("--long", type=int, default=2, help="responses of --long-length tokens")
    ap.add_argument("--long-length", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=16384, help="data.micro_batch_tokens")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="measured updates per variant")
    args = ap.parse_args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

    import torch

    from k15_megatron.train.policy_update import update_policy

    with tempfile.TemporaryDirectory() as work:
        cfg, trainer = _trainer(args, work)
        batch = _batch(args, trainer.arch.vocab_size)
        variants = {"packed": batch,
                    "padded": dataclasses.replace(batch, attention_mask=torch.ones_like(batch.attention_mask))}
        times = {name: [] for name in variants}
        metrics = {}
        for repeat in range(args.repeats + 1):  # the first round is the warm-up
            for name in (("packed", "padded") if repeat % 2 == 0 else ("padded", "packed")):
                start = time.perf_counter()
                metrics[name] = update_policy(trainer, variants[name], cfg.rl,
                                              micro_batch_tokens=cfg.data.micro_batch_tokens)
                if repeat:
                    times[name].append(time.perf_counter() - start)
    lengths = sorted(batch.response_lengths.tolist())
    print(f"model: qwen2 hidden={args.hidden} layers={args.layers} (tiny, float32, CPU, 1 process); "
          f"CPU load average during the run (shared machine): {os.getloadavg()[0]:.1f}")
    print(f"batch: {batch.num_samples} responses in {batch.num_groups} groups of {batch.group_size}, prompt "
          f"{args.prompt_tokens} tokens, response lengths median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
          f"real tokens {int(batch.attention_mask.sum())}, padded rows {batch.input_ids.numel()}; "
          f"data.micro_batch_tokens={args.budget}")
    for name in ("packed", "padded"):
        m = metrics[name]
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name}: {statistics.median(times[name]):.3f} s per update (runs {runs}), "
              f"{m['train/packed_tokens']:.0f} tokens trained, {m['train/micro_batches_per_update']:.0f} "
              "micro-batches")
    ours, base = statistics.median(times["packed"]), statistics.median(times["padded"])
    print(f"RESULT packing ours={ours:.3f} baseline={base:.3f} unit=s ratio={ours / base:.3f}")


if __name__ == "__main__":
    main()
