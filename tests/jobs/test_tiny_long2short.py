"""`k15 tiny --task long2short`: its arguments, its data stage and its report, on hand-made
`k15 eval` files. Its stages are the real commands (`k15 sft`, `merge`, `sample`, `dpo`, `rl`,
`eval`), each tested in its own module; the full-size demonstration is measured by running it
(README, docs/tiny_long2short.md), not here."""

import json
import os
import statistics

import pytest

from k15_megatron.jobs.tiny_long2short import build_report, render_report, write_data


def _write_eval(folder, name, lengths, successes):
    """A k15 eval output and its samples file: per prompt, its samples' token lengths and 0/1 successes."""
    output = os.path.join(folder, f"{name}.json")
    per_prompt = [sum(s) / len(s) for s in successes]
    with open(output, "w") as f:
        json.dump({"weights": name, "eval_path": "eval.jsonl", "per_prompt": per_prompt,
                   "num_samples": len(successes[0]), "eval/pass@1": statistics.fmean(per_prompt)}, f)
    with open(os.path.join(folder, f"{name}_samples.jsonl"), "w") as f:
        for i, (ls, ss) in enumerate(zip(lengths, successes)):
            samples = [{"text": "", "length": n, "correct": bool(s), "reward": float(s)} for n, s in zip(ls, ss)]
            f.write(json.dumps({"index": i, "prompt": f"p{i}", "samples": samples}) + "\n")
    return output


def test_report_columns_and_the_check_both_ways(tmp_path):
    """Long: 40 tokens a sample, 3 of 4 samples right on each of 40 prompts. merge: 10% shorter;
    rs: 40% shorter, the same successes (passes); dpo: 40% shorter, 1 of 4 right (fails on
    pass@1); rl: 25% shorter, better (fails on length). Means, relative changes, paired gains
    and SEs are checked against direct computation."""
    prompts = 40
    right = [[1, 1, 1, 0]] * prompts
    varied = [[1, 1, 1, 1] if i % 2 else [1, 1, 0, 0] for i in range(prompts)]  # mean 0.75, paired SE > 0
    files = {
        "long": _write_eval(tmp_path, "long", [[38, 42, 40, 40]] * prompts, right),
        "merge": _write_eval(tmp_path, "merge", [[36, 36, 36, 36]] * prompts, varied),
        "rs": _write_eval(tmp_path, "rs", [[24, 24, 20, 28]] * prompts, varied),
        "dpo": _write_eval(tmp_path, "dpo", [[24] * 4] * prompts, [[1, 0, 0, 0] if i % 2 else [1, 1, 0, 0]
                                                                 for i in range(prompts)]),
        "rl": _write_eval(tmp_path, "rl", [[30] * 4] * prompts, [[1] * 4] * prompts),
    }
    report = build_report(files, {"data": 1.0, "sft-long": 59.0})
    rows = report["models"]
    assert [rows[m]["mean_tokens"] for m in files] == pytest.approx([40, 36, 24, 24, 30])
    assert rows["rs"]["relative_length"] == pytest.approx(-0.4) and rows["merge"]["relative_length"] == pytest.approx(-0.1)
    assert rows["rs"]["tokens_change"] == pytest.approx(-16) and rows["rs"]["tokens_change_se"] == pytest.approx(0)
    dpo = rows["dpo"]["pass@1"]
    diffs = [(0.25 if i % 2 else 0.5) - 0.75 for i in range(prompts)]
    assert dpo["gain"] == pytest.approx(statistics.fmean(diffs))
    assert dpo["se"] == pytest.approx(statistics.stdev(diffs) / prompts ** 0.5)
    assert rows["rl"]["pass@1"]["after"] == 1.0 and rows["long"]["pass@1"]["after"] == 0.75
    assert report["checks"] == {"merge": {"shorter": False, "pass@1 kept": True},
                                "rs": {"shorter": True, "pass@1 kept": True},
                                "dpo": {"shorter": True, "pass@1 kept": False},
                                "rl": {"shorter": False, "pass@1 kept": True}}
    assert report["passed"] and report["total_seconds"] == 60.0
    text = render_report(report)
    assert "| shortest-RS SFT | 24.0 | -40.0% (-16.0 +- 0.0) | 0.750 | +0.0 | " in text
    assert "- [x] shortest-RS SFT" in text and "- [ ] DPO" in text and "RESULT: PASS" in text

    del files["rs"]  # without the one method that passes
    failed = build_report(files, {})
    assert not failed["passed"] and "RESULT: FAIL" in render_report(failed)
    # both bars are parameters: rl is 25% shorter, dpo's drop is 18.7 SE
    assert build_report(files, {}, min_shortening=0.2)["checks"]["rl"] == {"shorter": True, "pass@1 kept": True}
    assert dpo["gain"] / dpo["se"] == pytest.approx(-18.73, abs=0.01)
    assert build_report(files, {}, max_drop_se=19.0)["checks"]["dpo"] == {"shorter": True, "pass@1 kept": True}


def test_arguments_and_data_stage(tmp_path, monkeypatch):
    """--task long2short: its folder, its data overrides before the user's, --sample/--dpo only
    for it, no MoE; the data stage writes checked SFT demonstrations and the same prompts' plain
    ones, with the RL-train and eval prompts of the plain task."""
    from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits
    from k15_megatron.data.jsonl import read_jsonl
    from k15_megatron.jobs.tiny import TASKS, _parse_args, _task_config

    monkeypatch.delenv("K15_RUNS", raising=False)
    args = _parse_args(["--task", "long2short", "--task", "num_sft=30", "--dpo", "optim.lr=1e-5", "--sample", "seed=2"])
    assert (args.task_name, args.out) == ("long2short", os.path.join("runs", "tiny-long2short"))
    assert args.task == TASKS["long2short"]["data"] + ["num_sft=30"] and "verify_share=0.7" in args.task
    assert args.dpo == ["optim.lr=1e-5"] and args.sample == ["seed=2"] and args.sft == []
    for bad in (["--dpo", "optim.lr=1e-5"], ["--sample", "seed=1"], ["--task", "long2short", "--model", "moe"]):
        with pytest.raises(SystemExit):
            _parse_args(bad)

    task = _task_config("long2short", 0, args.task + ["num_train=20", "num_eval=10"])
    write_data(task, str(tmp_path))
    checked, plain = read_jsonl(str(tmp_path / "sft.jsonl")), read_jsonl(str(tmp_path / "sft_plain.jsonl"))
    reference = generate_splits(ArithmeticTaskConfig(max_operands=4, num_sft=30, num_train=20, num_eval=10))
    assert plain == reference["sft"] and len(checked) == 30
    assert [r["prompt"] for r in checked] == [r["prompt"] for r in plain]
    assert sum("check " in r["response"] for r in checked) > 10
    assert read_jsonl(str(tmp_path / "train.jsonl")) == reference["train"]
    assert read_jsonl(str(tmp_path / "eval.jsonl")) == reference["eval"]


def test_a_changed_stage_re_runs_its_own_branch_only(tmp_path, monkeypatch):
    """The stages after the long model are branches from it: a changed RL command re-runs rl and
    eval-rl, not the sampling/RS/DPO or short/merge stages; a changed long-model command re-runs
    everything. (Each stage's work is replaced by recording its name: the scheduling is pure logic;
    the commands themselves are tested in their own modules.)"""
    import shlex

    from k15_megatron.jobs import tiny, tiny_long2short

    ran = []
    monkeypatch.setattr(tiny.Stages, "run_command", lambda self, name, args, outputs=(): self.run(
        name, shlex.join(args), lambda: ran.append(name), outputs=outputs))
    monkeypatch.setattr(tiny_long2short, "write_data", lambda task, data_dir: ran.append("data"))
    monkeypatch.setattr(tiny_long2short, "build_report", lambda eval_files, seconds: {"passed": True})
    monkeypatch.setattr(tiny_long2short, "render_report", lambda report: "")

    def pipeline(*extra):
        ran.clear()
        argv = ["--task", "long2short", "--out", str(tmp_path / "run"), *extra]
        args = tiny._parse_args(argv)
        args.argv = argv
        tiny_long2short.run_pipeline(args)
        return list(ran)

    everything = ["data", "sft-long", "eval-long", "rl", "eval-rl", "sample", "sft-rs", "eval-rs", "dpo", "eval-dpo",
                  "sft-short", "eval-short", "merge", "eval-merge"]
    assert pipeline() == everything
    assert pipeline() == []
    assert pipeline("--rl", "rl.iterations=3") == ["rl", "eval-rl"]
    assert pipeline("--rl", "rl.iterations=3", "--dpo", "optim.lr=1e-5") == ["dpo", "eval-dpo"]
    assert pipeline("--rl", "rl.iterations=3", "--dpo", "optim.lr=1e-5", "--sample", "sample.max_prompts=8") == \
        ["sample", "sft-rs", "eval-rs", "dpo", "eval-dpo"]
    assert pipeline("--sft", "optim.train_iters=5") == everything[1:]
