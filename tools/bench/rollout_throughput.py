"""Rollout throughput: generated tokens/s of RolloutEngine (vLLM) vs transformers' generate.

Same work on both sides: a random tiny Qwen2 (k15_megatron.models.tiny, a few million
parameters, float32, CPU), the same prompts, temperature-1 sampling of exactly --new-tokens
tokens per prompt (EOS ignored, so both generate the same number of tokens), all prompts in one
batch. Ours also returns the sampled tokens' log-probs, which the baseline does not compute.

- ours:     RolloutEngine.generate (vLLM continuous batching, paged KV cache; the prefix
            cache is reset before each call; repeat detection off, so nothing is cut).
- baseline: AutoModelForCausalLM.generate(do_sample=True, min/max_new_tokens=N) on the batch.

Each side gets one short warm-up call (8 tokens), then --repeats timed calls, the two sides
interleaved in alternating order; the best time of each counts (the machine is shared: the
minimum is the least disturbed measurement). Both run in this process with the same torch
thread count (vLLM's CPU worker leaves it as it is). Engine start-up is not timed.

Run: python tools/bench/rollout_throughput.py [--prompts 32 --new-tokens 128 --hidden 256]
The last line is the RESULT line (unit tokens/s, ratio = ours / baseline).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def _baseline_runner(model_dir: str, prompts, new_tokens: int):
    """(run(n) generating n tokens per prompt with transformers, parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = torch.stack(prompts)  # equal-length prompts: no padding needed

    def run(n: int) -> None:
        with torch.no_grad():
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0)
        assert out.shape == (len(prompts), batch.shape[1] + n)

    return run, sum(p.numel() for p in model.parameters())


def _ours_runner(model_dir: str, prompts, new_tokens: int):
    """run(n) generating n tokens per prompt with RolloutEngine."""
    from k15_megatron.config.rl import RepeatConfig
    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.rollout import RolloutEngine, Sampling, expand_prompts

    cfg = RolloutConfig(max_response_tokens=new_tokens, max_model_len=1024, cpu_kv_cache_gib=1.0)
    engine = RolloutEngine.create(cfg, model_path=model_dir, repeat=RepeatConfig(enabled=False),
                                  seed=0)
    sampling = Sampling.from_config(cfg, temperature=1.0, ignore_eos=True)

    def run(n: int) -> None:
        requests = expand_prompts(prompts, k=1, token_budget=n, max_response_tokens=new_tokens)
        engine.llm.reset_prefix_cache()  # no prefill reuse from the previous call
        results = engine.generate(requests, sampling=sampling)
        assert all(r.tokens.numel() == n for r in results)

    return run


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from k15_megatron.models.tiny import save_tiny_hf_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_hf_model(
            os.path.join(tmp, "model"), "qwen2", init_std=0.1, hidden_size=args.hidden,
            intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128))
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.cat([torch.tensor([1]),
                              torch.randint(6, 100, (args.prompt_tokens - 1,), generator=gen)])
                   for _ in range(args.prompts)]
        total = args.prompts * args.new_tokens
        runs = {}
        runs["baseline"], n_params = _baseline_runner(model_dir, prompts, args.new_tokens)
        runs["ours"] = _ours_runner(model_dir, prompts, args.new_tokens)
        for run in runs.values():
            run(8)  # short warm-up call: kernels, allocator, engine caches
        best = {name: float("inf") for name in runs}
        for r in range(args.repeats):  # interleaved, alternating order (shared machine)
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                best[name] = min(best[name], _timed(runs[name], args.new_tokens))
    t_base, t_ours = best["baseline"], best["ours"]
    ours, base = total / t_ours, total / t_base
    print(f"model: qwen2 hidden={args.hidden} layers={args.layers} ({n_params / 1e6:.1f} M "
          f"parameters); {args.prompts} prompts x "
          f"{args.new_tokens} new tokens = {total} tokens per call; torch threads "
          f"{torch.get_num_threads()}")
    print(f"CPU load average (shared machine): {os.getloadavg()[0]:.1f}")
    print(f"transformers generate: {t_base:.3f} s  ({base:.0f} tokens/s)")
    print(f"RolloutEngine (vLLM):  {t_ours:.3f} s  ({ours:.0f} tokens/s, with log-probs)")
    print(f"RESULT rollout_throughput ours={ours:.1f} baseline={base:.1f} unit=tokens/s "
          f"ratio={ours / base:.3f}")


if __name__ == "__main__":
    main()
