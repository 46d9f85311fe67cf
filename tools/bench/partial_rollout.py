"""Partial rollouts vs full rollouts on a long-tailed length mix (PAPER.md section 4's claim).

The model. A tiny Qwen2 (untied, real transformer compute) whose weights are set so that
every position has the same next-token distribution: EOS with probability q = 1/--mean-length
and the other V-1 tokens uniform. Response lengths (EOS included) are then exactly geometric
with mean 1/q, capped at --cap, far above the mean: a long tail, as with real chains of
thought. Construction: attention and MLP output projections are zero, so the residual stream is
the token embedding; every embedding is the first unit vector, so the final RMSNorm output is
the same vector a * e_0 for every token; the LM head is zero except for EOS's weight on e_0,
which gives EOS the logit log(q (V-1) / (1-q)) and every other token logit 0. Printed: the
sampled length statistics, to check the construction.

The loop. Each iteration opens --prompts groups of k = --group-size trajectories
(N = prompts * k new trajectories), "syncs weights" (RolloutEngine.mark_weights_updated, which
drops the prefix cache as a real sync must, so continued segments pay their prefill again),
generates one segment for every unfinished trajectory and records it in the segment replay
buffer (k15_megatron.rollout.partial.rollout_iteration):

- baseline: full rollouts, token budget = cap: every trajectory finishes in the iteration that
  opened it; an iteration lasts until its longest response ends (few sequences left decoding).
- ours:     partial rollouts, budget = --budget tokens per trajectory per iteration;
  unfinished ones continue next iteration, so every iteration decodes at most budget steps
  with a full batch. In steady state N trajectories finish per iteration on average.

Measured after warm-up iterations (partial rollouts need a few to reach steady state), the two
modes interleaved iteration by iteration (same engine, alternating order) so that load changes
on a shared machine affect both alike: wall time per iteration, generated tokens and finished
trajectories per iteration, and decoding steps per iteration (the longest segment of each
call: all its requests decode together), a load-independent view of the same effect. For equal
work the partial time is normalised to N finished trajectories per iteration:
  ours = partial time / finished * N,  baseline = full-rollout time per iteration (N finished).

Run: python tools/bench/partial_rollout.py [--mean-length 64 --cap 1024 --budget 128]
The last line is the RESULT line (unit s/iteration, ratio = ours / baseline; < 1 is faster).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

EOS = 2  # k15_megatron.models.tiny: pad=0, bos=1, eos=2


def build_geometric_model(out_dir: str, *, mean_length: float, hidden: int, layers: int,
                          max_positions: int) -> str:
    """Save the constant-distribution model described in the module doc; returns out_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    from k15_megatron.models.tiny import save_tiny_hf_model

    save_tiny_hf_model(out_dir, "qwen2", tie_word_embeddings=False, hidden_size=hidden,
                       intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                       max_position_embeddings=max_positions)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    cfg = model.config
    q = 1.0 / mean_length
    eos_logit = math.log(q * (cfg.vocab_size - 1) / (1.0 - q))
    normed = 1.0 / math.sqrt(1.0 / hidden + cfg.rms_norm_eps)  # RMSNorm(e_0)[0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS, 0] = eos_logit / normed
        # check the construction: P(EOS) = q at every position of a random sequence
        ids = torch.randint(3, cfg.vocab_size, (2, 50))
        p_eos = torch.softmax(model(ids).logits.float(), dim=-1)[..., EOS]
        assert torch.allclose(p_eos, torch.full_like(p_eos, q), rtol=1e-4), p_eos
    model.save_pretrained(out_dir)
    return out_dir


class ModeRun:
    """One mode's replay buffer, prompt stream and statistics of its measured iterations."""

    def __init__(self, engine, *, budget: int, args, warmup: int):
        import torch

        from k15_megatron.config.rl import ReplayConfig
        from k15_megatron.rl.replay import SegmentReplayBuffer
        from k15_megatron.rollout import Sampling

        self.engine, self.budget, self.args, self.warmup = engine, budget, args, warmup
        replay = ReplayConfig(segment_token_budget=budget,
                              max_segments=-(-args.cap // budget) + 1)
        self.buf = SegmentReplayBuffer(replay, group_size=args.group_size)
        self.sampling = Sampling.from_config(engine.cfg, temperature=1.0)
        self.gen = torch.Generator().manual_seed(0)
        self.time, self.iters, self.tokens, self.finished, self.steps = 0.0, 0, 0, 0, 0
        self.lengths: list[int] = []

    def iteration(self, it: int) -> None:
        """One rollout iteration of ``k15 rl`` (rollout_iteration), after a weight sync."""
        import torch

        from k15_megatron.rollout import rollout_iteration

        a = self.args
        prompts = [(it * a.prompts + j, torch.randint(3, 100, (16,), generator=self.gen))
                   for j in range(a.prompts)]
        t0 = time.perf_counter()
        self.engine.mark_weights_updated(it)  # as after a weight sync: prefix cache dropped
        stats = rollout_iteration(self.engine, self.buf, prompts, iteration=it, sampling=self.sampling)
        elapsed = time.perf_counter() - t0
        batch = self.buf.pop_batch(iteration=it)
        if it >= self.warmup:
            self.time += elapsed
            self.iters += 1
            self.tokens += stats.generated_tokens
            self.finished += stats.num_finished
            self.steps += stats.decoding_steps
            if batch is not None:
                self.lengths += batch.response_lengths.tolist()

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mean-length", type=float, default=64.0)
    ap.add_argument("--cap", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=6, help="measured iterations per mode")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()

    from k15_megatron.config.rl import RepeatConfig
    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.rollout import RolloutEngine

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_geometric_model(os.path.join(tmp, "geometric"),
                                          mean_length=args.mean_length, hidden=args.hidden,
                                          layers=args.layers, max_positions=args.cap + 64)
        cfg = RolloutConfig(max_response_tokens=args.cap, max_model_len=args.cap + 64,
                            cpu_kv_cache_gib=1.0)
        engine = RolloutEngine.create(cfg, model_path=model_dir, repeat=RepeatConfig(), seed=0)
        warmup = max(2, math.ceil(4 * args.mean_length / args.budget))
        full = ModeRun(engine, budget=args.cap, args=args, warmup=warmup)
        part = ModeRun(engine, budget=args.budget, args=args, warmup=warmup)
        for it in range(warmup + args.iterations):
            # interleaved, alternating order: load changes on the shared machine hit both alike
            for mode in ((full, part) if it % 2 == 0 else (part, full)):
                mode.iteration(it)
    n = args.prompts * args.group_size
    print(f"model: qwen2 hidden={args.hidden} layers={args.layers}, CPU load average during the "
          f"run (shared machine): {os.getloadavg()[0]:.1f}")
    lengths = sorted(full.lengths)
    mean = sum(lengths) / len(lengths)
    print(f"lengths (full rollouts, {len(lengths)} trajectories): mean {mean:.1f} (geometric mean "
          f"{args.mean_length:.0f}), p50 {lengths[len(lengths) // 2]}, p99 "
          f"{lengths[int(0.99 * (len(lengths) - 1))]}, max {lengths[-1]}, cap {args.cap}")
    for name, r, budget in (("full rollouts", full, args.cap), ("partial rollouts", part,
                                                                 args.budget)):
        print(f"{name:16s} budget {budget:5d}: {r.time / r.iters:.3f} s/iteration, "
              f"{r.tokens / r.iters:.0f} tokens/iteration, "
              f"{r.finished / r.iters:.1f} finished/iteration (N = {n}), "
              f"{r.steps / r.iters:.0f} decoding steps/iteration, "
              f"{r.time / r.finished * 1e3:.1f} ms per finished trajectory")
    ours = part.time / part.finished * n
    base = full.time / full.iters
    print(f"RESULT partial_rollout ours={ours:.3f} baseline={base:.3f} unit=s/iteration "
          f"ratio={ours / base:.3f}")


if __name__ == "__main__":
    main()
