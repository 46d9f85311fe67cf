"""RL throughput: ``k15 rl`` vs TRL's GRPOTrainer, the same RL work on this machine, one run.

Same on both sides:
- the model: one random Qwen2 Hugging Face folder built from examples/tiny_arith.yaml's
  architecture (1.08M parameters, character tokenizer, float32; or the larger size below);
- the prompts: --prompts arithmetic prompts per generation round from the same JSONL, in the
  chat template, k = --group-size samples each at temperature 1, at most --max-tokens new tokens;
- the updates: --iterations generation rounds, each followed by --updates optimizer steps over
  the round's samples (k15: rl.updates_per_iteration; TRL: steps_per_generation, one pass), Adam,
  the same learning rate; the reward is the arithmetic checker (both score every sample).

- ours:     ``k15 rl examples/tiny_arith_rl.yaml`` from the HF folder: 2 processes (one core
            each), Megatron-Core on gloo, a colocated vLLM CPU replica per process, in-place
            weight sync, mirror-descent loss (with its recomputed reference log-probs).
- baseline: TRL ``GRPOTrainer`` (beta 0, so no reference model; one process using both cores
            through torch's intra-op threads), generating with transformers' generate, TRL's
            default. Its vLLM modes need a GPU build of vLLM's server or colocated engine.

Each side runs as its own subprocess, one after the other. Timed: the training loop only (ours:
the sum of the iterations' ``time/iteration_s``, including rollout, reward, train and weight
sync; TRL: ``train_runtime``); start-up (imports, model load, vLLM engine build) is reported
separately as whole-process wall time. Samples/s = trained samples / loop seconds; tokens/s =
generated tokens / loop seconds.

Two model sizes (``--sizes``, both by default): ``tiny``, the model above at the flags' work
(the tiny default's RL sizes), and ``25m``, the same family at 25.6M parameters (8 layers,
hidden 512; ``SIZES``) on less work (3 rounds x 16 prompts x k=4), where matrix products
rather than per-step overheads take the time on both sides.

Needs the bench extra: .venv/bin/pip install -e ".[bench]" (TRL 1.16.0).
Run: python tools/bench/rl_vs_trl.py [--iterations 5 --prompts 64 --group-size 8 --max-tokens 64]
(the defaults are the tiny default's RL sizes, examples/tiny_arith_rl.yaml).
Each size ends with a RESULT line (unit samples/s, ratio = ours / baseline), ``rl_vs_trl_25m``
first; the last line is the tiny size's ``rl_vs_trl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from k15_megatron.jobs.tiny import STAGE_ENV as ENV  # the tiny default's process settings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# The model sizes compared: "tiny" is the tiny default's model at its RL sizes; "25m" a 25.6M-parameter
# model of the same family (8 layers, hidden 512) with the work cut so a run takes minutes, where
# the matrix products, not per-step overheads, take the time on both sides.
SIZES = {
    "tiny": {"model": [], "work": {}},
    "25m": {"model": ["model.num_layers=8", "model.hidden_size=512", "model.ffn_hidden_size=1408",
                      "model.num_attention_heads=8", "model.num_query_groups=8"],
            "work": {"iterations": 3, "prompts": 16, "group_size": 4}},
}


def prepare_work(work: str, num_prompts: int, seed: int, model_overrides: tuple = ()) -> tuple[str, str]:
    """(HF model folder, prompts JSONL) shared by both sides; ``model_overrides``: dotted
    ``model.*`` overrides of examples/tiny_arith.yaml's architecture."""
    from k15_megatron.config import load_config, resolve_model_arch
    from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits
    from k15_megatron.data.jsonl import write_jsonl
    from k15_megatron.models.tiny import build_char_tokenizer, save_hf_model_from_arch

    cfg = load_config(os.path.join(REPO, "examples", "tiny_arith.yaml"), list(model_overrides))
    model_dir = os.path.join(work, "model")
    save_hf_model_from_arch(resolve_model_arch(cfg.model), model_dir, seed=seed, tokenizer=build_char_tokenizer())
    splits = generate_splits(ArithmeticTaskConfig(seed=seed, num_sft=0, num_eval=0, num_train=num_prompts,
                                                  reward="k15_megatron.rewards.arithmetic:arithmetic_reward"))
    prompts = os.path.join(work, "train.jsonl")
    write_jsonl(prompts, splits["train"])
    return model_dir, prompts


def k15_rl_command(run_dir: str, model_dir: str, prompts: str, *, iterations: int, prompts_per_iteration: int,
                   group_size: int, updates: int, max_tokens: int, lr: float, seed: int,
                   model_overrides: tuple = ()) -> list:
    """The ``k15 rl`` command the benchmarks time: the tiny default's recipe from the random model
    folder (its architecture changed by ``model_overrides``, as the folder was made), each of the 2
    data-parallel ranks' mini-batch one micro-batch, no checkpoints, no length penalty or repeat
    stop (so the work is the same as the baseline's)."""
    return [sys.executable, "-m", "k15_megatron.cli", "rl", os.path.join(REPO, "examples", "tiny_arith_rl.yaml"),
            f"run_dir={run_dir}", f"model.hf_path={model_dir}", "model.init_from=null", f"data.train_path={prompts}",
            f"rl.iterations={iterations}", f"rl.prompts_per_iteration={prompts_per_iteration}",
            f"rl.group_size={group_size}", f"rl.updates_per_iteration={updates}",
            f"rl.groups_per_micro_batch={prompts_per_iteration // (2 * updates)}",
            f"rollout.max_response_tokens={max_tokens}", f"optim.lr={lr}", f"seed={seed}",
            "checkpoint.save_interval=0", "rl.length_penalty.enabled=false", "rl.repeat.enabled=false",
            *model_overrides]


def run_ours(args, work: str, model_dir: str, prompts: str, model_overrides: tuple = ()) -> dict:
    run_dir = os.path.join(work, "k15")
    cmd = k15_rl_command(run_dir, model_dir, prompts, iterations=args.iterations, prompts_per_iteration=args.prompts,
                         group_size=args.group_size, updates=args.updates, max_tokens=args.max_tokens, lr=args.lr,
                         seed=args.seed, model_overrides=model_overrides)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    from k15_megatron.jobs.metrics_log import read_metrics

    loop = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "time/iteration_s" in r]
    return {"loop_s": sum(r["time/iteration_s"] for r in loop),
            "samples": sum(r.get("train/num_samples", 0.0) for r in loop),
            "generated_tokens": sum(r["rollout/generated_tokens"] for r in loop),
            "mean_reward": sum(r.get("reward/task_mean", 0.0) for r in loop) / len(loop), "wall_s": wall}


def run_baseline(args, work: str, model_dir: str, prompts: str) -> dict:
    out = os.path.join(work, "trl.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker", out, "--model", model_dir, "--data", prompts,
           "--iterations", str(args.iterations), "--prompts", str(args.prompts), "--group-size", str(args.group_size),
           "--updates", str(args.updates), "--max-tokens", str(args.max_tokens), "--lr", str(args.lr),
           "--seed", str(args.seed), "--work", work]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's default: all cores
    env.update({k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"})
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(out) as f:
        return {**json.load(f), "wall_s": wall}


def trl_worker(args) -> None:
    """The baseline side, in its own process (see the module docstring)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from k15_megatron.data.jsonl import read_prompts
    from k15_megatron.rewards.arithmetic import check_answer

    records = read_prompts(args.data)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in records])

    def reward(prompts, completions, answer, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [check_answer(t, a) for t, a in zip(texts, answer)]

    samples_per_round = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=os.path.join(args.work, "trl"), per_device_train_batch_size=samples_per_round // args.updates,
        gradient_accumulation_steps=1, steps_per_generation=args.updates, num_generations=args.group_size,
        max_completion_length=args.max_tokens, max_steps=args.iterations * args.updates, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.0, num_iterations=1, temperature=1.0, top_p=1.0,
        use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no", logging_steps=1,
        seed=args.seed, dataloader_num_workers=0, disable_dropout=True, log_completions=False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    result = trainer.train()
    # Every generated sample is trained on exactly once (num_iterations=1); TRL logs the mean
    # completion length of each generation round.
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    samples = config.max_steps * config.per_device_train_batch_size
    with open(args.trl_worker, "w") as f:
        json.dump({"loop_s": result.metrics["train_runtime"], "samples": float(samples),
                   "generated_tokens": sum(lengths) / len(lengths) * samples,
                   "mean_reward": sum(rewards) / max(len(rewards), 1),
                   "torch_threads": torch.get_num_threads()}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5, help="generation rounds")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per round")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (k)")
    parser.add_argument("--updates", type=int, default=2, help="optimizer steps per round")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per sample at most")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default="tiny,25m",
                        help="model sizes, comma-separated (tiny: the flags' work; 25m: its own smaller work)")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args)
        return
    if args.prompts % (2 * args.updates):
        parser.error("--prompts must be a multiple of 2 x --updates (2 data-parallel ranks x mini-batches)")
    import importlib.util

    if importlib.util.find_spec("trl") is None:  # before any side runs, not as a worker's traceback
        parser.error('the baseline needs TRL: .venv/bin/pip install -e ".[bench]" (make bench installs it)')
    sizes = args.sizes.split(",")
    unknown = [size for size in sizes if size not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; choose from {sorted(SIZES)}")
    results = {}
    for size in sorted(sizes, key=lambda size: size != "25m"):  # the tiny point last: the RESULT line
        point = argparse.Namespace(**{**vars(args), **SIZES[size]["work"]})
        model = tuple(SIZES[size]["model"])
        with tempfile.TemporaryDirectory(prefix="k15-bench-trl-") as work:
            model_dir, prompts = prepare_work(work, point.prompts * point.iterations, point.seed, model)
            params = _parameter_count(model_dir)
            ours = run_ours(point, work, model_dir, prompts, model)
            base = run_baseline(point, work, model_dir, prompts)
        results[size] = _report(size, point, params, ours, base)
    for size, (ours_rate, base_rate) in results.items():
        name = "rl_vs_trl" if size == "tiny" else f"rl_vs_trl_{size}"
        print(f"RESULT {name} ours={ours_rate:.2f} baseline={base_rate:.2f} unit=samples/s "
              f"ratio={ours_rate / base_rate:.3f}")


def _parameter_count(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def _report(size: str, point, params: int, ours: dict, base: dict) -> tuple[float, float]:
    """Print one model size's comparison; (ours, baseline) samples/s."""
    print(f"[{size}: {params / 1e6:.2f}M parameters] work: {point.iterations} rounds x {point.prompts} prompts x "
          f"k={point.group_size}, <= {point.max_tokens} new tokens, {point.updates} updates per round")
    for name, r in (("k15 rl (Megatron + vLLM, 2 procs)", ours), ("TRL GRPOTrainer (transformers)", base)):
        print(f"  {name:36s} samples {r['samples']:6.0f} | loop {r['loop_s']:7.1f} s | "
              f"{r['samples'] / r['loop_s']:7.1f} samples/s | {r['generated_tokens'] / r['loop_s']:8.0f} gen tok/s | "
              f"process wall {r['wall_s']:6.1f} s | mean reward {r['mean_reward']:.3f}")
    return ours["samples"] / ours["loop_s"], base["samples"] / base["loop_s"]


if __name__ == "__main__":
    main()
