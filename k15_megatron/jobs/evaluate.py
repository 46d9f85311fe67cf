"""Evaluation on a held-out prompt set: pass@1, pass@k and response length.

``evaluate(engine, prompts, manager, tokenizer, ...)`` samples ``num_samples`` complete
responses per prompt with the rollout engine (temperature 0 gives greedy pass@1), scores them
with the prompts' rewards and returns the per-prompt success counts, so two evaluations of the
same prompts can be compared pairwise (:func:`k15_megatron.jobs.tiny_report.paired_stats`).
Image prompts (a vision-language model) are generated with their decoded images
(:meth:`k15_megatron.data.prompt_set.PromptSet.images_of`); their rewards read the text as for
text prompts.
With ``keep_texts`` it also returns every generated text with its reward (``samples``, one
record per prompt; ``k15 eval`` writes them as a JSONL file beside its metrics).

pass@k is the unbiased estimator of Chen et al. (2021): for a prompt with c correct out of n
samples, 1 - C(n - c, k) / C(n, k), averaged over prompts.
"""

from __future__ import annotations

import math
import time

import torch

from k15_megatron.parallel.device import collective_device
from k15_megatron.parallel.initialize import global_rank
from k15_megatron.rollout.partial import expand_prompts
from k15_megatron.rollout.replicas import generate_everywhere


def pass_at_k(num_correct: torch.Tensor, num_samples: int, k: int) -> float:
    """Mean over prompts of 1 - C(n-c, k)/C(n, k) (``num_correct``: [P] counts out of n)."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= num_samples={num_samples}")
    values = [prompt_pass_at_k(num_samples, c, k) for c in num_correct.tolist()]
    return sum(values) / len(values)


def prompt_pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k)/C(n, k): pass@k of one prompt with ``c`` correct of ``n`` samples."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(engine, prompts, manager, tokenizer, *, num_samples: int, temperature: float,
             max_response_tokens: int, seed: int, ks=(1,), keep_texts: bool = False) -> dict:
    """Sample, score and summarise (collective). ``prompts``: a
    :class:`~k15_megatron.data.prompt_set.PromptSet` (image prompts are generated with their
    images). Returns metrics plus ``per_prompt`` [P] rates and, with ``keep_texts``,
    ``samples`` (:func:`sample_records`)."""
    from k15_megatron.rollout.engine import Sampling

    start = time.perf_counter()
    images = [prompts.images_of(i) for i in range(len(prompts))] if prompts.has_images else None
    requests = expand_prompts(prompts.token_ids, k=num_samples, token_budget=max_response_tokens,
                              max_response_tokens=max_response_tokens, images=images)
    # No per-request seeds: vLLM's CPU sampler cannot rewind a seeded generator when chunked
    # prefill splits a prompt ("CPU Generator does not use offset"); the engine's own seeded
    # stream keeps runs reproducible.
    sampling = Sampling.from_config(engine.cfg, temperature=temperature, seed=None)
    results = generate_everywhere(engine, requests, sampling=sampling)
    texts = [tokenizer.decode(r.tokens.tolist(), skip_special_tokens=True) for r in results]
    samples = [prompts.records[i // num_samples] for i in range(len(results))]
    scores = torch.tensor(manager.score(texts, samples) if global_rank() == 0 else [0.0] * len(texts))
    if torch.distributed.is_initialized():
        scores = scores.to(collective_device())  # NCCL broadcasts device tensors only
        torch.distributed.broadcast(scores, src=0)
        scores = scores.cpu()
    correct = (scores >= 1.0 - 1e-6).view(len(prompts), num_samples)
    counts = correct.sum(dim=1)
    lengths = torch.tensor([r.tokens.numel() for r in results], dtype=torch.float32)
    metrics = {f"eval/pass@{k}": pass_at_k(counts, num_samples, k) for k in ks if k <= num_samples}
    metrics.update({"eval/response_length_mean": lengths.mean().item(), "eval/num_prompts": float(len(prompts)),
                    "eval/seconds": time.perf_counter() - start})
    metrics.update(manager.metrics())  # reward failures and latencies (rank 0 scored)
    metrics["per_prompt"] = counts.float() / num_samples
    if keep_texts:
        metrics["samples"] = sample_records(prompts.records, texts=texts, scores=scores.tolist(),
                                            correct=correct.flatten().tolist(), results=results,
                                            num_samples=num_samples)
    return metrics


def sample_records(records, *, texts, scores, correct, results, num_samples: int) -> list:
    """One dict per prompt: ``index`` (position in the evaluated set), ``prompt``
    (:func:`prompt_text`), ``answer``
    (None if the record has none), ``pass_rate`` (correct / num_samples) and ``samples``:
    ``num_samples`` dicts of ``text`` (decoded response), ``reward`` (the prompt's reward),
    ``correct`` (reward >= 1 - 1e-6, as pass@k counts it), ``length`` (response tokens) and
    ``finish_reason`` (stop | max_length | repeat); for a prompt with images also ``images``
    (each image's path as the record gives it, ``"<inline image>"`` for inline bytes). Inputs
    are flat, prompt-major."""
    out = []
    for i, record in enumerate(records):
        rows = range(i * num_samples, (i + 1) * num_samples)
        samples = [{"text": texts[j], "reward": float(scores[j]), "correct": bool(correct[j]),
                    "length": int(results[j].tokens.numel()), "finish_reason": results[j].finish_reason}
                   for j in rows]
        entry = {"index": i, "prompt": prompt_text(record), "answer": record.get("answer"),
                 "pass_rate": sum(s["correct"] for s in samples) / num_samples, "samples": samples}
        sources = image_sources(record)
        if sources:
            entry["images"] = [s if isinstance(s, str) else "<inline image>" for s in sources]
        out.append(entry)
    return out



def image_sources(record) -> list:
    """The image sources of a prompt record (paths or inline bytes, in order; [] for a text
    prompt), as :func:`k15_megatron.data.images.chat_turns` reads them."""
    from k15_megatron.data.images import chat_turns, has_images

    return list(chat_turns(record)[1]) if has_images(record) else []


def prompt_text(record) -> str:
    """The prompt of a record as text: its ``prompt``, or for chat ``messages`` each turn's text
    (image parts as ``<image>``) on its own line."""
    if "prompt" in record:
        return record["prompt"]
    lines = []
    for message in record.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            content = "".join("<image>" if part.get("type") == "image" else str(part.get("text", ""))
                              for part in content)
        lines.append(str(content))
    return "\n".join(lines)
