"""How ``k15 rl``'s iteration time grows with the work: prompts per iteration, group size, response length.

From a base point (--prompts prompts x k = --group-size samples, at most --max-tokens new
tokens), each of the three is doubled and doubled again with the other two kept, and every
point is one ``k15 rl`` run of --iterations iterations (the tiny default's model and recipe,
``examples/tiny_arith_rl.yaml``, from a random tiny Qwen2 folder, so responses run to about the
cap and the response length is set by --max-tokens; 2 processes, colocated vLLM). Printed per
point: seconds per iteration and per phase (rollout, reward, train, sync, and the rest: the
hybrid engine's log-prob check, logging; the mean over the iterations after the first, which
pays one-off warm-up) and the tokens generated and trained.

The comparison: each point's iteration time against the base point's scaled in proportion to
the samples x response-length work (the time if every phase grew linearly). The RESULT line
is the largest point of the prompts axis: ours = its seconds per iteration, baseline = the base
point's x 4, ratio < 1 where fixed costs are amortised.

Run: python tools/bench/rl_scaling.py [--prompts 16 --group-size 4 --max-tokens 32 --iterations 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

from rl_vs_trl import k15_rl_command, prepare_work

from k15_megatron.jobs.tiny import STAGE_ENV

PHASES = ("rollout", "reward", "train", "sync")
LR = 3e-5
"""examples/tiny_arith_rl.yaml's learning rate (the time does not depend on it)."""


def run_point(work: str, model_dir: str, prompts_file: str, *, prompts: int, group_size: int, max_tokens: int,
              iterations: int, name: str) -> dict:
    """One ``k15 rl`` run; returns the mean seconds per iteration and per phase over the
    iterations after the first, and the mean generated / trained tokens per iteration."""
    from k15_megatron.jobs.metrics_log import read_metrics

    run_dir = os.path.join(work, name)
    cmd = k15_rl_command(run_dir, model_dir, prompts_file, iterations=iterations, prompts_per_iteration=prompts,
                         group_size=group_size, updates=2, max_tokens=max_tokens, lr=LR, seed=0)
    subprocess.run(cmd, check=True, env={**os.environ, **STAGE_ENV}, stdout=subprocess.DEVNULL)
    rows = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "time/iteration_s" in r][1:]

    def mean(key):
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    out = {"iteration": mean("time/iteration_s"), "generated": mean("rollout/generated_tokens"),
           "trained": mean("train/tokens")}
    out.update({phase: mean(f"time/{phase}_s") for phase in PHASES})
    out["other"] = out["iteration"] - sum(out[phase] for phase in PHASES)  # log-prob check, logging, waits
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=3, help="per point; the first is not counted")
    args = parser.parse_args()
    if args.prompts % 4 or args.iterations < 2:
        parser.error("--prompts must be a multiple of 4 (2 ranks x 2 mini-batches), --iterations at least 2")
    base = {"prompts": args.prompts, "group_size": args.group_size, "max_tokens": args.max_tokens}
    points = [("base", dict(base))]
    for axis in base:
        for factor in (2, 4):
            points.append((f"{axis} x{factor}", {**base, axis: base[axis] * factor}))
    results = {}
    with tempfile.TemporaryDirectory(prefix="k15-bench-scaling-") as work:
        largest = max(p["prompts"] for _, p in points)
        model_dir, prompts_file = prepare_work(work, largest * args.iterations, 0)
        for i, (name, point) in enumerate(points):
            results[name] = run_point(work, model_dir, prompts_file, iterations=args.iterations, name=f"p{i}", **point)
            r = results[name]
            print(f"{name:15s} prompts {point['prompts']:3d} k {point['group_size']:2d} cap {point['max_tokens']:4d} | "
                  f"{r['iteration']:6.2f} s/iteration | " + " ".join(f"{ph} {r[ph]:5.2f}" for ph in PHASES + ("other",))
                  + f" | generated {r['generated']:7.0f} trained {r['trained']:7.0f} tokens", flush=True)

    def work_units(point):  # samples x response-length cap
        return point["prompts"] * point["group_size"] * point["max_tokens"]

    print("\nagainst linear growth (the base point's time x the work ratio):")
    for name, point in points[1:]:
        linear = results["base"]["iteration"] * work_units(point) / work_units(base)
        print(f"  {name:15s} {results[name]['iteration']:6.2f} s vs {linear:6.2f} s linear "
              f"(ratio {results[name]['iteration'] / linear:.2f})")
    ours, baseline = results["prompts x4"]["iteration"], 4 * results["base"]["iteration"]
    print(f"RESULT rl_scaling ours={ours:.3f} baseline={baseline:.3f} unit=s ratio={ours / baseline:.3f}")


if __name__ == "__main__":
    main()
