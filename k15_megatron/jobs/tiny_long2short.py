"""``k15 tiny --task long2short``: the long2short demonstration on the tiny arithmetic task.

PAPER.md section 7's four methods, each run as the real ``k15`` command by
:class:`k15_megatron.jobs.tiny.Stages` (a completed stage is skipped on a re-run), into
``runs/tiny-long2short`` with the recipes ``examples/tiny_long2short_*.yaml``
(docs/tiny_long2short.md has the design and the measured runs):

1. ``data``: the arithmetic task on 2-4 operands whose SFT demonstrations carry redundant check
   lines (``verify_share``, :mod:`k15_megatron.data.arithmetic`) in ``data/sft.jsonl``, the same
   demonstrations without them in ``data/sft_plain.jsonl``, the RL-train and held-out prompts;
2. ``sft-long``: the "long" model, ``k15 sft`` from random weights on the checked demonstrations;
3. ``rl``: long2short RL, ``k15 rl`` from the long checkpoint with the length penalty from the
   first iteration and a much smaller response budget (40 tokens, the evaluation's 96);
4. ``sample``: ``k15 sample`` of the long model, 8 responses per RL-train prompt (the first 2,000);
5. ``sft-rs``: shortest rejection sampling, the long checkpoint SFT-ed on the shortest correct ones;
6. ``dpo``: ``k15 dpo`` from the long checkpoint on the sampled groups (shortest correct vs
   wrong and vs correct > 1.5x longer);
7. ``sft-short``: the "short" model, the long checkpoint briefly SFT-ed on the plain ones;
8. ``merge``: ``k15 merge`` of long and short (equal weights);

each model followed by ``eval-<model>``: ``k15 eval`` on the same 1,000 held-out prompts with
the same settings (8 samples at temperature 1). Stages 3, 4-6 and 7-8 are branches from the long
model (:data:`BRANCHES`): a stage that runs again re-runs the later stages of its own branch, not
the other branches. The report (``report.json``, ``report.md``) gives per model the mean
response tokens (from the eval samples files), the change against the long model, sampled
pass@1 and its paired gain over the long model on the same prompts (:func:`k15_megatron.jobs.tiny_report.paired_comparison`:
SE and z). The check: at least one long2short method (merge, shortest-RS SFT, DPO, long2short
RL; the short model is a reference) shortens responses by :data:`MIN_SHORTENING` or more with
pass@1 lower by at most :data:`MAX_DROP_SE` standard errors; the exit status is 1 when it fails.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import asdict, replace
from typing import Dict, List

from k15_megatron.jobs.eval_output import samples_file

MIN_SHORTENING = 0.30
"""Required relative drop of the mean response tokens against the long model."""
MAX_DROP_SE = 2.0
"""Largest allowed drop of sampled pass@1 against the long model, in paired standard errors."""

MODELS = {"long": "long (SFT on checked demonstrations)", "rl": "long2short RL", "rs": "shortest-RS SFT",
          "dpo": "DPO", "short": "short (long + SFT on plain; reference)", "merge": "merge (long + short, equal weights)"}
"""The evaluated models in stage order, with their report labels."""
BRANCHES = (("rl",), ("sample", "rs", "dpo"), ("short", "merge"))
"""The stages after the long model's, in order (a model is evaluated right after it): branches
that start from the long model, each independent of the others, so that re-running one (a
changed command) re-runs its own later stages only."""
STAGE_NAMES = {"long": "sft-long", "rs": "sft-rs", "short": "sft-short"}
METHODS = ("merge", "rs", "dpo", "rl")
"""The long2short methods the check is on."""


def write_data(task, data_dir: str) -> None:
    """The task's files (checked SFT demonstrations) and ``sft_plain.jsonl``: the same
    demonstrations without their check lines (``verify_share=0``: the same prompts and slips)."""
    from k15_megatron.data.arithmetic import generate_splits, write_task_files
    from k15_megatron.data.jsonl import write_jsonl

    write_task_files(task, data_dir)
    plain = generate_splits(replace(task, verify_share=0.0, num_train=0, num_eval=0))["sft"]
    write_jsonl(os.path.join(data_dir, "sft_plain.jsonl"), plain)


def run_pipeline(args) -> dict:
    """All stages (module docstring) from ``k15 tiny``'s parsed ``args``; returns the report."""
    from k15_megatron.jobs.tiny import EXAMPLES, Stages, _task_config

    stages = Stages(args.out, fresh=args.fresh)
    out = stages.out
    data = os.path.join(out, "data")
    task = _task_config(args.task_name, args.seed, args.task)
    stages.run("data", json.dumps(asdict(task), sort_keys=True), lambda: write_data(task, data), outputs=[data])
    seed = f"seed={args.seed}"

    def recipe(name):
        return str(EXAMPLES / f"tiny_long2short_{name}.yaml")

    def from_long(name, train_path):
        return [seed, f"run_dir={out}/{name}", f"model.init_from={out}/long/checkpoints", f"data.train_path={train_path}"]

    commands = {
        "long": ["sft", recipe("sft"), seed, f"run_dir={out}/long", f"data.train_path={data}/sft.jsonl", *args.sft],
        "rl": ["rl", recipe("rl"), *from_long("rl", f"{data}/train.jsonl"), *args.rl],
        "sample": ["sample", recipe("sample"), *from_long("sample", f"{data}/train.jsonl"), *args.sample],
        "rs": ["sft", recipe("rs"), *from_long("rs", f"{out}/sample/shortest.jsonl"), *args.sft],
        "dpo": ["dpo", recipe("dpo"), *from_long("dpo", f"{out}/sample/sample_groups.jsonl"), *args.dpo],
        "short": ["sft", recipe("short"), *from_long("short", f"{data}/sft_plain.jsonl"), *args.sft],
        "merge": ["merge", f"{out}/long/checkpoints", f"{out}/short/checkpoints", "--out", f"{out}/merge"],
    }
    eval_files = {}

    def run_branch(branch):
        for name in branch:
            stages.run_command(STAGE_NAMES.get(name, name), commands[name], outputs=[f"{out}/{name}"])
            if name not in MODELS:
                continue
            weights = ([f"model.hf_path={out}/merge", "model.init_from=null"] if name == "merge"
                       else [f"model.init_from={out}/{name}/checkpoints"])
            output = eval_files[name] = os.path.join(out, "eval", f"{name}.json")
            stages.run_command(f"eval-{name}", ["eval", recipe("eval"), seed, f"run_dir={out}/eval/{name}", *weights,
                                                f"data.eval_path={data}/eval.jsonl", f"eval.output={output}", *args.eval],
                               outputs=[f"{out}/eval/{name}", output, samples_file(output)])

    run_branch(("long",))
    after_long = stages.rerun
    for branch in BRANCHES:
        stages.rerun = after_long  # a branch depends on the long model, not on the branches before it
        run_branch(branch)
    report = build_report(eval_files, stages.seconds)
    report["command"] = "k15 tiny " + shlex.join(args.argv)
    from k15_megatron.jobs.tiny_report import save_report

    save_report(out, report, render_report(report))
    print(f"tiny: wrote report.json, report.md, eval/*.json, eval/*_samples.jsonl and the runs in {out}", flush=True)
    return report


# -- the report -------------------------------------------------------------------------------------
def per_prompt_lengths(path: str) -> List[float]:
    """Mean response tokens of each prompt of a ``k15 eval`` samples file, in file order."""
    from k15_megatron.data.jsonl import read_jsonl

    return [math.fsum(s["length"] for s in record["samples"]) / len(record["samples"])
            for record in read_jsonl(path)]


def build_report(eval_files: Dict[str, str], seconds: Dict[str, float], *, min_shortening: float = MIN_SHORTENING,
                 max_drop_se: float = MAX_DROP_SE) -> dict:
    """Per model (``eval_files``: name -> ``k15 eval`` output, ``long`` among them, its samples
    file beside it): mean response tokens, their paired change against ``long`` (tokens, SE,
    relative), sampled pass@1 and its paired comparison with ``long``; for each of
    :data:`METHODS` present, whether it is ``min_shortening`` shorter with a pass@1 drop of at
    most ``max_drop_se`` SE. ``passed``: at least one method is."""
    from k15_megatron.jobs.tiny_report import paired_comparison, paired_stats

    evals, lengths = {}, {}
    for name, path in eval_files.items():
        with open(path) as f:
            evals[name] = json.load(f)
        lengths[name] = per_prompt_lengths(samples_file(path))
    base = lengths["long"]
    base_mean = math.fsum(base) / len(base)
    rows, checks = {}, {}
    for name in eval_files:
        mean = math.fsum(lengths[name]) / len(lengths[name])
        tokens = paired_stats(base, lengths[name]) if name != "long" else {"gain": 0.0, "se": 0.0, "z": 0.0}
        rows[name] = {"label": MODELS.get(name, name), "mean_tokens": mean, "tokens_change": tokens["gain"],
                      "tokens_change_se": tokens["se"], "relative_length": mean / base_mean - 1.0,
                      "pass@1": paired_comparison(evals["long"], evals[name])}
        if name in METHODS:
            c = rows[name]["pass@1"]
            checks[name] = {"shorter": rows[name]["relative_length"] <= -min_shortening,
                            "pass@1 kept": c["gain"] >= -max_drop_se * c["se"]}
    return {"models": rows, "checks": checks, "min_shortening": min_shortening, "max_drop_se": max_drop_se,
            "seconds": seconds, "total_seconds": math.fsum(seconds.values()),
            "passed": any(all(check.values()) for check in checks.values())}


def render_report(report: dict) -> str:
    rows = report["models"]
    first = rows["long"]["pass@1"]
    lines = ["", "# k15 tiny --task long2short: long2short methods on held-out arithmetic "
                 f"({first['num_prompts']} prompts x {first['num_samples']} samples, paired with the long model)", "",
             "| model | mean response tokens | vs long | sampled pass@1 | gain vs long (points) | SE | z |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        c = row["pass@1"]
        versus = ("" if name == "long" else
                  f"{100 * row['relative_length']:+.1f}% ({row['tokens_change']:+.1f} +- {row['tokens_change_se']:.1f})")
        gain = ("", "", "") if name == "long" else (f"{100 * c['gain']:+.1f}", f"{100 * c['se']:.1f}", f"{c['z']:.1f}")
        lines.append(f"| {row['label']} | {row['mean_tokens']:.1f} | {versus} | {c['after']:.3f} | " + " | ".join(gain) + " |")
    stage_times = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
    lines += ["", f"Wall time: {report['total_seconds'] / 60:.1f} min ({stage_times}).", "",
              f"Check: a method at least {100 * report['min_shortening']:.0f}% shorter with pass@1 not lower "
              f"by more than {report['max_drop_se']:g} SE:"]
    for name, check in report["checks"].items():
        marks = ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in check.items())
        lines.append(f"- [{'x' if all(check.values()) else ' '}] {MODELS.get(name, name)}: {marks}")
    lines += ["", "RESULT: " + ("PASS" if report["passed"] else "FAIL"), ""]
    return "\n".join(lines)
