"""Calibrate the built-in tiny task: SFT warm-up, eval, RL, eval, on one CPU process.

Answers one question before the real `k15 rl` job (Megatron + vLLM) runs the same recipe: with
this task (`k15_megatron.data.arithmetic`), model size and these hyperparameters, does on-policy
RL lift held-out pass@1 well beyond noise within the time budget? Training here is plain PyTorch
on a transformers Qwen2 model (not Megatron); sampling uses vLLM's CPU engine with in-place
weight reloads, as the real loop does. The RL update is the project's mirror-descent loss
(`k15_megatron.rl.loss`) with the optimizer reset every iteration (PAPER.md section 1) and the
project's prompt sampler (`k15_megatron.rl.sampling`).

Phases (each timed): data -> SFT -> eval "before" -> RL -> eval "after". Evaluation is paired:
the same held-out prompts before and after, per prompt: greedy correctness and the mean
correctness of ``eval_samples`` samples at ``temperature``; the gain's standard error is that of
the per-prompt differences. pass@k uses the unbiased estimator over the same samples.

Usage::

    .venv/bin/python tools/calibrate_tiny_task.py --out /tmp/calib [--rl_iterations 40 ...]

Every field of `Settings` (and of `ArithmeticTaskConfig` as ``--task.FIELD``) is a flag. The run
folder receives data/*.jsonl, the SFT model, rl_curve.jsonl and summary.json; the last stdout
line is the JSON summary. Results of the calibration runs are in docs/tiny_task.md.

Threads: on a shared 2-core machine the script pins one intra-op thread and unbinds vLLM's
OpenMP threads (measured: 5-10x faster under contention than vLLM's default binding).
"""

from __future__ import annotations

import os

# Before torch/vLLM are imported: in-process engine core, small KV cache, one unbound thread.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Dict, List, Sequence  # noqa: E402

import torch  # noqa: E402

from k15_megatron.config.rl import SamplingConfig  # noqa: E402
from k15_megatron.data.arithmetic import ArithmeticTaskConfig, check_answer, generate_splits  # noqa: E402
from k15_megatron.data.formatting import prompt_token_ids, response_token_ids  # noqa: E402
from k15_megatron.data.jsonl import read_prompts, read_sft, write_jsonl  # noqa: E402
from k15_megatron.rl.loss import mirror_descent_loss  # noqa: E402
from k15_megatron.rl.sampling import PromptSampler  # noqa: E402
from k15_megatron.jobs.evaluate import prompt_pass_at_k  # noqa: E402
from k15_megatron.jobs.tiny_report import paired_stats, trend  # noqa: E402


@dataclass
class Settings:
    """Every knob of one calibration run (defaults = the calibrated recipe)."""

    out: str = "/tmp/k15_tiny_calibration"
    """Run folder."""
    seed: int = 0
    """Seed of model init, SFT order, vLLM sampling and the RL prompt sampler."""
    task: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)
    """The task and split sizes."""
    hidden_size: int = 128
    """Model width (head_dim = hidden_size / num_heads must be 32 or 64 for vLLM's CPU attention)."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (and key/value heads)."""
    intermediate_size: int = 512
    """MLP width."""
    sft_steps: int = 400
    """SFT optimizer steps."""
    sft_batch: int = 64
    """SFT sequences per step."""
    sft_lr: float = 2e-3
    """Peak SFT learning rate (linear warm-up over 5% of the steps, cosine to 10%)."""
    max_new_tokens: int = 64
    """Generation cap per response (every demonstration is shorter)."""
    eval_samples: int = 8
    """Samples per eval prompt at ``temperature`` (sampled pass@1 is their mean; pass@k)."""
    temperature: float = 1.0
    """Sampling temperature for RL rollouts and sampled evaluation."""
    rl_iterations: int = 40
    """RL iterations (rollout -> reward -> train -> sync)."""
    rl_prompts: int = 64
    """Prompts per RL iteration."""
    rl_k: int = 8
    """Samples per prompt (the group of the mirror-descent baseline)."""
    rl_lr: float = 3e-5
    """Adam learning rate of RL (the optimizer is reset every iteration)."""
    rl_tau: float = 0.05
    """Mirror-descent KL weight tau."""
    rl_updates: int = 2
    """Optimizer steps per iteration (the groups are split into this many minibatches)."""
    rl_sampling: str = "uniform"
    """Prompt sampling strategy of `PromptSampler` (uniform | prioritized | curriculum)."""
    sft_from: str = ""
    """Calibration shortcut: start RL from this already fine-tuned model folder (skips SFT)."""


# ---- model and tokens -------------------------------------------------------------------------
def build_model(s: Settings, path: str) -> None:
    """Write a random untied Qwen2 of the chosen size plus the character tokenizer to ``path``."""
    from k15_megatron.models.tiny import save_tiny_hf_model

    if s.hidden_size % s.num_heads or s.hidden_size // s.num_heads not in (32, 64):
        raise ValueError(f"hidden_size / num_heads = {s.hidden_size}/{s.num_heads} must be 32 or 64 "
                         "(vLLM CPU attention)")
    save_tiny_hf_model(path, "qwen2", seed=s.seed, hidden_size=s.hidden_size,
                       intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                       num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads,
                       max_position_embeddings=256, tie_word_embeddings=False)


def pad_batch(seqs: Sequence[Sequence[int]], loss_from: Sequence[int]):
    """Right-padded [B, T] ids, attention mask, and a [B, T-1] mask of predicted positions >=
    loss_from[b] (the response tokens), for next-token log-probs."""
    width = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    target_mask = torch.zeros(len(seqs), width - 1, dtype=torch.bool)
    for b, (x, start) in enumerate(zip(seqs, loss_from)):
        ids[b, :len(x)] = torch.tensor(x)
        attn[b, :len(x)] = 1
        target_mask[b, start - 1:len(x) - 1] = True
    return ids, attn, target_mask


def token_logprobs(model, ids, attn) -> torch.Tensor:
    """[B, T-1] log-prob of each next token under ``model`` (float32)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


# ---- SFT --------------------------------------------------------------------------------------
def run_sft(model, tokenizer, records: List[dict], s: Settings) -> Dict[str, float]:
    """Response-only cross-entropy on the demonstrations (response + EOS), AdamW, warm-up+cosine."""
    rng = random.Random(f"{s.seed}/sft-order")
    encoded = [(prompt_token_ids(tokenizer, r["prompt"]), response_token_ids(tokenizer, r["response"]))
               for r in records]
    opt = torch.optim.AdamW(model.parameters(), lr=s.sft_lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, s.sft_steps // 20)
    order: List[int] = []
    losses = []
    model.train()
    for step in range(s.sft_steps):
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (
            1 + math.cos(math.pi * (step - warmup) / max(1, s.sft_steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = s.sft_lr * scale
        if len(order) < s.sft_batch:
            order = list(range(len(encoded)))
            rng.shuffle(order)
        batch = [encoded[order.pop()] for _ in range(s.sft_batch)]
        ids, attn, mask = pad_batch([p + r for p, r in batch], [len(p) for p, _ in batch])
        lp = token_logprobs(model, ids, attn)
        loss = -(lp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == s.sft_steps - 1:
            print(f"[sft] step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    return {"sft_final_loss": sum(losses[-20:]) / len(losses[-20:])}


# ---- vLLM -------------------------------------------------------------------------------------
def start_engine(path: str, s: Settings):
    from vllm import LLM

    return LLM(path, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
               max_model_len=256, seed=s.seed)


def sync_weights(llm, model) -> None:
    """In-place reload of vLLM's weights from the HF model's state dict (HF names)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    llm.collective_rpc(lambda worker: worker.model_runner.reload_weights(
        weights_iterator=iter(state.items())))


def generate(llm, prompts: List[List[int]], *, n: int, temperature: float, max_tokens: int,
             logprobs: bool):
    """vLLM outputs, one per prompt, each with ``n`` completions (no per-request seeds: on CPU
    they crash vLLM 0.32 when a prefill is chunked; the engine seed fixes the stream)."""
    from vllm import SamplingParams

    params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens,
                            logprobs=0 if logprobs else None)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


# ---- evaluation -------------------------------------------------------------------------------
def evaluate(llm, tokenizer, records: List[dict], s: Settings) -> Dict[str, list]:
    """Per-prompt greedy correctness (0/1), sampled mean correctness, pass@k, response length."""
    prompts = [prompt_token_ids(tokenizer, r["prompt"]) for r in records]
    greedy = generate(llm, prompts, n=1, temperature=0.0, max_tokens=s.max_new_tokens,
                      logprobs=False)
    sampled = generate(llm, prompts, n=s.eval_samples, temperature=s.temperature,
                       max_tokens=s.max_new_tokens, logprobs=False)
    out: Dict[str, list] = {"greedy": [], "sampled": [], "pass_at_k": [], "length": []}
    for rec, g, smp in zip(records, greedy, sampled):
        text = tokenizer.decode(g.outputs[0].token_ids, skip_special_tokens=True)
        out["greedy"].append(check_answer(text, rec["answer"]))
        hits = [check_answer(tokenizer.decode(c.token_ids, skip_special_tokens=True), rec["answer"])
                for c in smp.outputs]
        out["sampled"].append(sum(hits) / len(hits))
        out["pass_at_k"].append(prompt_pass_at_k(len(hits), int(sum(hits)), s.eval_samples))
        out["length"].append(sum(len(c.token_ids) for c in smp.outputs) / len(smp.outputs))
    return out


def eval_summary(ev: Dict[str, list], records: List[dict]) -> Dict[str, float]:
    out = {name: math.fsum(ev[name]) / len(ev[name]) for name in ("greedy", "sampled", "pass_at_k", "length")}
    for level in sorted({r["difficulty"] for r in records}):
        idx = [i for i, r in enumerate(records) if r["difficulty"] == level]
        out[f"sampled_d{level}"] = sum(ev["sampled"][i] for i in idx) / len(idx)
        out[f"greedy_d{level}"] = sum(ev["greedy"][i] for i in idx) / len(idx)
    return out


# ---- RL ---------------------------------------------------------------------------------------
def rl_update(model, groups: List[dict], s: Settings) -> Dict[str, float]:
    """One iteration's training on ``groups`` ({"prompt": ids, "samples": [(tokens, behaviour
    log-prob sum, reward)]}): a fresh Adam, ``rl_updates`` minibatch steps of the mirror-descent
    loss with the sampling policy as reference. Groups whose k rewards are all equal are left
    out: their policy-gradient term is exactly 0 (only tau's pull toward pi_i would remain)."""
    live = [g for g in groups if len({r for _, _, r in g["samples"]}) > 1]
    stats = {"groups_used": float(len(live)), "loss": 0.0, "logprob_mismatch": 0.0}
    if not live:
        return stats
    opt = torch.optim.Adam(model.parameters(), lr=s.rl_lr, betas=(0.9, 0.99))
    model.train()
    chunks = [live[i::s.rl_updates] for i in range(min(s.rl_updates, len(live)))]
    for step, chunk in enumerate(chunks):
        seqs, starts, ref, rewards = [], [], [], []
        for g in chunk:
            for tokens, lp_sum, reward in g["samples"]:
                seqs.append(g["prompt"] + tokens)
                starts.append(len(g["prompt"]))
                ref.append(lp_sum)
                rewards.append(reward)
        ids, attn, mask = pad_batch(seqs, starts)
        seq_lp = (token_logprobs(model, ids, attn) * mask).sum(-1)
        ref_t = torch.tensor(ref, dtype=torch.float32)
        if step == 0:  # before any update: trainer vs vLLM log-probs of the same policy
            stats["logprob_mismatch"] = float((seq_lp.detach() - ref_t).abs().max())
        loss = mirror_descent_loss(seq_lp, ref_t, torch.tensor(rewards), s.rl_k, s.rl_tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats["loss"] += loss.item() / len(chunks)
    model.eval()
    return stats


def rollout(llm, tokenizer, records: List[dict], ids: List[int], s: Settings) -> List[dict]:
    """k samples per prompt at ``temperature`` with behaviour log-probs, scored by the checker."""
    prompts = [prompt_token_ids(tokenizer, records[i]["prompt"]) for i in ids]
    outputs = generate(llm, prompts, n=s.rl_k, temperature=s.temperature,
                       max_tokens=s.max_new_tokens, logprobs=True)
    groups = []
    for i, p, out in zip(ids, prompts, outputs):
        samples = []
        for c in out.outputs:
            tokens = list(c.token_ids)
            lp_sum = sum(next(iter(d.values())).logprob for d in c.logprobs)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            samples.append((tokens, lp_sum, check_answer(text, records[i]["answer"])))
        groups.append({"index": i, "prompt": p, "samples": samples})
    return groups


def run_rl(model, llm, tokenizer, records: List[dict], s: Settings) -> List[dict]:
    """The synchronous loop; returns one metrics dict per iteration (also to rl_curve.jsonl)."""
    if s.temperature != 1.0:
        raise ValueError("the RL reference log-probs come from vLLM's sampler, which reports "
                         "untempered log-probs: use temperature=1.0")
    difficulties = torch.tensor([float(r["difficulty"]) for r in records])
    sampler = PromptSampler(len(records), SamplingConfig(strategy=s.rl_sampling),
                            difficulties=difficulties, seed=s.seed)
    curve = []
    for it in range(s.rl_iterations):
        t0 = time.time()
        ids = sampler.sample(s.rl_prompts, it).tolist()
        groups = rollout(llm, tokenizer, records, ids, s)
        t1 = time.time()
        rewards = [r for g in groups for _, _, r in g["samples"]]
        sampler.update(torch.tensor([g["index"] for g in groups for _ in g["samples"]]),
                       torch.tensor(rewards))
        stats = rl_update(model, groups, s)
        t2 = time.time()
        sync_weights(llm, model)
        llm.reset_prefix_cache()  # cached prompt KV belongs to the old weights
        t3 = time.time()
        lengths = [len(t) for g in groups for t, _, _ in g["samples"]]
        row = {"iteration": it, "reward": sum(rewards) / len(rewards),
               "response_tokens": sum(lengths) / len(lengths), **stats,
               "rollout_s": t1 - t0, "train_s": t2 - t1, "sync_s": t3 - t2}
        curve.append(row)
        print(f"[rl] it {it} reward {row['reward']:.3f} groups {stats['groups_used']:.0f} "
              f"mismatch {stats['logprob_mismatch']:.1e} rollout {t1 - t0:.1f}s "
              f"train {t2 - t1:.1f}s sync {t3 - t2:.1f}s", flush=True)
    return curve


# ---- driver -----------------------------------------------------------------------------------
def parse_settings(argv: Sequence[str]) -> Settings:
    """Flags from the dataclass fields: --FIELD and --task.FIELD (lists as comma lists)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for prefix, obj in (("", Settings()), ("task.", ArithmeticTaskConfig())):
        for f in dataclasses.fields(obj):
            if f.name == "task":
                continue
            default = getattr(obj, f.name)
            kind = type(default) if not isinstance(default, list) else str
            parser.add_argument(f"--{prefix}{f.name}", type=kind, default=None)
    args = vars(parser.parse_args(argv))
    s, task = Settings(), ArithmeticTaskConfig()
    for key, value in args.items():
        if value is None:
            continue
        target, name = (task, key[5:]) if key.startswith("task.") else (s, key)
        if isinstance(getattr(target, name), list):
            value = [float(v) for v in value.split(",") if v]
        setattr(target, name, value)
    s.task = task
    return s


def prepare_data(s: Settings) -> Dict[str, List[dict]]:
    """Generate the splits, write them as JSONL and read them back (the real jobs' path)."""
    splits = generate_splits(s.task)
    data = {}
    for name, records in splits.items():
        path = os.path.join(s.out, "data", f"{name}.jsonl")
        write_jsonl(path, records)
        data[name] = read_sft(path) if name == "sft" else read_prompts(path)
    return data


class PhaseClock:
    """Wall-clock and process-CPU seconds per phase (CPU time is less distorted by other
    processes on a shared machine than wall time)."""

    def __init__(self):
        self.times: Dict[str, float] = {}
        self._last = (time.time(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.time(), time.process_time())
        self.times[f"{name}_s"] = now[0] - self._last[0]
        self.times[f"{name}_cpu_s"] = now[1] - self._last[1]
        self._last = now
        print(f"[time] {name}: {self.times[f'{name}_s']:.0f}s wall, "
              f"{self.times[f'{name}_cpu_s']:.0f}s cpu", flush=True)


def main(argv: Sequence[str]) -> Dict[str, object]:
    from transformers import AutoModelForCausalLM

    from k15_megatron.models.tiny import build_char_tokenizer

    s = parse_settings(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(s.seed)
    os.makedirs(s.out, exist_ok=True)
    clock = PhaseClock()
    data = prepare_data(s)
    tokenizer = build_char_tokenizer()
    model_dir, sft_stats = s.sft_from or os.path.join(s.out, "model"), {}
    if not s.sft_from:
        build_model(s, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    clock.lap("data")
    if not s.sft_from:
        sft_stats = run_sft(model, tokenizer, data["sft"], s)
        model.save_pretrained(model_dir, safe_serialization=True)
    clock.lap("sft")
    llm = start_engine(model_dir, s)
    clock.lap("engine")
    before = evaluate(llm, tokenizer, data["eval"], s)
    clock.lap("eval_before")
    print("[eval before]", json.dumps(eval_summary(before, data["eval"])), flush=True)
    curve = run_rl(model, llm, tokenizer, data["train"], s)
    write_jsonl(os.path.join(s.out, "rl_curve.jsonl"), curve)
    clock.lap("rl")
    after = evaluate(llm, tokenizer, data["eval"], s)
    clock.lap("eval_after")
    summary = {
        "settings": dataclasses.asdict(s),
        "num_params": sum(p.numel() for p in model.parameters()), **sft_stats,
        "before": eval_summary(before, data["eval"]), "after": eval_summary(after, data["eval"]),
        "gain_greedy": paired_stats(before["greedy"], after["greedy"]),
        "gain_sampled": paired_stats(before["sampled"], after["sampled"]),
        "gain_pass_at_k": paired_stats(before["pass_at_k"], after["pass_at_k"]),
        "reward_curve": trend(range(len(curve)), [row["reward"] for row in curve]) if len(curve) >= 5 else {},
        "times": clock.times, "load_avg": os.getloadavg(),
    }
    with open(os.path.join(s.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    result = main(sys.argv[1:])
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}))
