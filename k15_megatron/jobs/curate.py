"""``k15 curate CONFIG [overrides]``: prompt-set curation for RL (PAPER.md section 3).

Reads the RL prompt records of ``data.train_path`` (text or images; prompts too long for the
rollout budget follow ``data.too_long`` as in ``k15 rl``) and removes, in this order:

1. format rules (``curate.drop_formats``: multiple-choice, true/false and proof prompts by
   default): regular expressions over the prompt text and the answer
   (:mod:`k15_megatron.data.curation`, patterns in ``curate.prompt_patterns`` /
   ``curate.answer_patterns``); no model needed;
2. "easy to hack" prompts: the model, told to give only the final answer
   (``curate.hack_instruction``, at most ``curate.hack_max_tokens`` tokens), answers correctly in
   at least one of ``curate.hack_samples`` tries (the paper's N = 8);
3. with ``curate.drop_solved``, prompts that every one of the ``curate.difficulty_samples``
   samples (the paper's 10, at ``curate.difficulty_temperature``) solves.

The kept records are written to ``curate.output`` with ``pass_rate`` (of the difficulty samples)
and ``difficulty`` (the number of those samples that failed: 0 = all solved), the labels the
curriculum sampler reads (``rl.sampling.strategy=curriculum``). ``curate.report`` (Markdown, and
a JSON twin ``<report without .md>.json``) counts what each rule removed and shows examples. The
model is the one ``k15 eval`` would evaluate (``model.init_from`` or ``model.hf_path``), in the
colocated vLLM engine; correctness is the prompts' rewards (reward >= 1 - 1e-6).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from typing import List

import torch

from k15_megatron.data.curation import compile_rules, matching_rule
from k15_megatron.data.jsonl import write_jsonl
from k15_megatron.data.prompt_set import PromptSet, prompt_token_limit
from k15_megatron.data.sampled import with_absolute_images
from k15_megatron.jobs.eval_output import write_json
from k15_megatron.jobs.evaluate import evaluate, prompt_text
from k15_megatron.jobs.generation import start_generation
from k15_megatron.jobs.preflight import data_processor
from k15_megatron.rewards.registry import RewardManager

INDEX_KEY = "_curate_index"
"""Key the direct-answer variants carry back to their prompt (removed from written records)."""


def direct_answer_record(record: dict, instruction: str) -> dict:
    """``record`` asking for the answer alone: ``instruction`` after a plain prompt (new line),
    or as a text part after the last user turn of a chat prompt."""
    out = dict(record)
    if "messages" not in out:
        out["prompt"] = f"{out['prompt']}\n{instruction}"
        return out
    messages = [dict(m) for m in out["messages"]]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    content = messages[last]["content"]
    messages[last]["content"] = (f"{content}\n{instruction}" if isinstance(content, str)
                                 else list(content) + [{"type": "text", "text": f"\n{instruction}"}])
    out["messages"] = messages
    return out


def _subset(prompts: PromptSet, keep: List[int]) -> PromptSet:
    return dataclasses.replace(prompts, records=[prompts.records[i] for i in keep],
                               token_ids=[prompts.token_ids[i] for i in keep], difficulties=None, filtered_lines=[],
                               images=[prompts.images[i] for i in keep] if prompts.images else [])


class Curation:
    """The state of one ``k15 curate`` run on this rank; ``run()`` does the three steps."""

    def __init__(self, cfg):
        if not cfg.data.train_path:
            raise ValueError("k15 curate needs data.train_path (a JSONL of {prompt, answer} records)")
        self.cfg = cfg
        self.processor = data_processor(cfg)
        self.base_dir = os.path.dirname(os.path.abspath(cfg.data.train_path))

        def read(trainer):
            self.trainer = trainer
            return self._read(cfg.data.train_path, limit=cfg.curate.max_prompts)

        self.trainer, self.rollout, self.prompts = start_generation(cfg, before_engine=read)
        self.rewards = RewardManager(cfg.rewards)
        self.removed = {}  # rule -> [record]

    def _read(self, path: str, *, limit: int = 0, max_prompt_tokens=None, too_long=None) -> PromptSet:
        return PromptSet.from_jsonl(path, self.trainer.tokenizer, limit=limit,
                                    max_prompt_tokens=max_prompt_tokens or prompt_token_limit(self.cfg.rollout),
                                    too_long=too_long or self.cfg.data.too_long, processor=self.processor,
                                    fields=self.cfg.data.fields)

    def _pass_rates(self, prompts: PromptSet, *, num_samples: int, temperature: float, max_tokens: int):
        return evaluate(self.rollout, prompts, self.rewards, self.trainer.tokenizer, num_samples=num_samples,
                        temperature=temperature, max_response_tokens=max_tokens, seed=self.cfg.seed,
                        ks=[1])["per_prompt"]

    def _drop(self, rule: str, indices: List[int], keep: List[int]) -> List[int]:
        gone = set(indices)
        self.removed[rule] = [self.prompts.records[i] for i in keep if i in gone]
        return [i for i in keep if i not in gone]

    def format_step(self, keep: List[int]) -> List[int]:
        c = self.cfg.curate
        rules = compile_rules(c.prompt_patterns, c.answer_patterns, c.drop_formats)
        matched = {i: matching_rule(prompt_text(self.prompts.records[i]), self.prompts.records[i].get("answer"), rules)
                   for i in keep}
        for name in rules:
            keep = self._drop(name, [i for i, rule in matched.items() if rule == name], keep)
        return keep

    def hack_step(self, keep: List[int]) -> List[int]:
        """Direct-answer tries on the kept prompts; those answered correctly once are dropped.
        The variants are written to ``<run_dir>/curate_direct_answer.jsonl`` and read back as the
        jobs read prompts, with room for ``hack_max_tokens`` of response (a variant longer than
        that allows is not tried, and its prompt kept)."""
        c = self.cfg.curate
        path = os.path.join(self.cfg.run_dir, "curate_direct_answer.jsonl")
        if self.trainer.is_logging_rank:
            write_jsonl(path, [{**direct_answer_record(with_absolute_images(self.prompts.records[i], self.base_dir),
                                                       c.hack_instruction), INDEX_KEY: i} for i in keep])
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        max_tokens = min(c.hack_max_tokens, self.cfg.rollout.max_response_tokens)
        variants = self._read(path, max_prompt_tokens=self.cfg.rollout.max_model_len - max_tokens, too_long="filter")
        rates = self._pass_rates(variants, num_samples=c.hack_samples, temperature=c.hack_temperature,
                                 max_tokens=max_tokens)
        hacked = [record[INDEX_KEY] for record, rate in zip(variants.records, rates.tolist()) if rate > 0]
        return self._drop("easy to hack", hacked, keep)

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.rollout.shutdown()  # destroys process-wide groups: after the last collective

    def _run(self) -> dict:
        c = self.cfg.curate
        keep = self.format_step(list(range(len(self.prompts))))
        if c.hack_samples and keep:
            keep = self.hack_step(keep)
        rates = {}
        if c.difficulty_samples and keep:
            values = self._pass_rates(_subset(self.prompts, keep), num_samples=c.difficulty_samples,
                                      temperature=c.difficulty_temperature,
                                      max_tokens=self.cfg.rollout.max_response_tokens)
            rates = dict(zip(keep, values.tolist()))
            if c.drop_solved:
                keep = self._drop("solved by every difficulty sample", [i for i in keep if rates[i] >= 1.0], keep)
        kept = [self._labelled(i, rates.get(i)) for i in keep]
        summary = self._summary(kept)
        if self.trainer.is_logging_rank:
            write_jsonl(c.output, kept)
            write_json(os.path.splitext(c.report)[0] + ".json", summary)
            _write_text(c.report, report_markdown(summary, self.removed, kept, examples=c.report_examples))
            removed = ", ".join(f"{rule} {len(records)}" for rule, records in self.removed.items())
            print(f"curate: kept {len(kept)} of {summary['read']} prompts (removed: {removed})", flush=True)
            print(f"curate: wrote {os.path.abspath(c.output)} and {os.path.abspath(c.report)}", flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return summary

    def _labelled(self, index: int, rate) -> dict:
        record = with_absolute_images(self.prompts.records[index], self.base_dir)
        if rate is not None:
            n = self.cfg.curate.difficulty_samples
            record.update(pass_rate=rate, difficulty=int(round((1.0 - rate) * n)))
        return record

    def _summary(self, kept: List[dict]) -> dict:
        return {"train_path": self.cfg.data.train_path, "read": len(self.prompts) + len(self.prompts.filtered_lines),
                "too_long": len(self.prompts.filtered_lines),
                "removed": {rule: len(records) for rule, records in self.removed.items()}, "kept": len(kept),
                "difficulty_histogram": dict(sorted(Counter(r["difficulty"] for r in kept if "difficulty" in r).items()))}


def report_markdown(summary: dict, removed: dict, kept: List[dict], *, examples: int) -> str:
    """The report: one table row per rule (prompts removed), then up to ``examples`` prompts
    per rule and the kept prompts' difficulty histogram."""
    lines = [f"# Curation of {summary['train_path']}", "",
             f"{summary['read']} prompts read, {summary['too_long']} dropped as too long for the rollout budget, "
             f"{summary['kept']} kept.", "", "| rule | removed |", "|---|---|"]
    lines += [f"| {rule} | {count} |" for rule, count in summary["removed"].items()]
    for rule, records in removed.items():
        if records and examples:
            lines += ["", f"## {rule}: examples", ""]
            lines += [f"- {json.dumps(prompt_text(r))[:200]} (answer {r.get('answer')!r})" for r in records[:examples]]
    if summary["difficulty_histogram"]:
        lines += ["", "## Kept prompts by difficulty (failed samples)", "", "| difficulty | prompts |", "|---|---|"]
        lines += [f"| {d} | {n} |" for d, n in summary["difficulty_histogram"].items()]
    return "\n".join(lines) + "\n"


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(cfg) -> dict:
    return Curation(cfg).run()


HELP_KEYS = ("data.train_path", "curate", "rewards.default", "rollout.max_response_tokens", "rollout.max_model_len",
             "rollout.tensor_parallel_size")
"""The config keys ``k15 curate --help`` lists (besides those of every job)."""


def main(argv=None) -> int:
    from k15_megatron.jobs.launch import job_main
    from k15_megatron.jobs.preflight import job_checks

    return job_main("k15 curate", __doc__, run, argv, help_keys=HELP_KEYS, job_errors=job_checks("curate"))
