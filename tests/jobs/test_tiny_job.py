"""`k15 tiny` (the README's main job) runs every stage as the real command, reports paired
before/after gains computed from the `k15 eval` outputs, and skips completed stages on a re-run.

Shortened: a few hundred demonstrations, 8 SFT steps, 5 RL iterations (the report's trend needs 5), 24 eval prompts. Whether
RL beats three standard errors at full size is measured by `make tiny` (README, docs/tiny_task.md),
not here; this test checks the pipeline and its arithmetic.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from tooling import REPO_ROOT

QUICK = ["--task", "num_sft=800", "--task", "num_train=64", "--task", "num_eval=24",
         "--sft", "optim.train_iters=8", "--sft", "optim.lr_warmup_iters=1", "--sft", "logging.log_interval=4",
         "--rl", "rl.iterations=5", "--rl", "rl.prompts_per_iteration=8", "--rl", "rl.groups_per_micro_batch=2",
         "--rl", "checkpoint.save_interval=0", "--rl", "rl.length_penalty.warmup_iterations=2"]


def _tiny(out, *extra):
    return subprocess.run([sys.executable, "-m", "k15_megatron.cli", "tiny", "--out", str(out), *QUICK, *extra],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.distributed
@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_and_reports_paired_gains(tmp_path):
    out = tmp_path / "tiny"
    proc = _tiny(out, "--min-z=-1e9")  # any gain passes: the full-size bar is measured by `make tiny`
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    for mode, num_samples in (("greedy", 1), ("sampled", 8)):
        before = json.load(open(out / "eval" / f"sft_{mode}.json"))
        after = json.load(open(out / "eval" / f"rl_{mode}.json"))
        assert len(before["per_prompt"]) == len(after["per_prompt"]) == 24
        assert before["num_samples"] == num_samples
        diffs = [a - b for a, b in zip(after["per_prompt"], before["per_prompt"])]
        mean = sum(diffs) / 24
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 23 / 24)
        c = report["comparisons"][mode]
        assert c["gain"] == pytest.approx(mean) and c["se"] == pytest.approx(se)
        assert c["before"] == pytest.approx(before["eval/pass@1"]) and c["after"] == pytest.approx(after["eval/pass@1"])
    metrics = [json.loads(line) for line in open(out / "rl" / "metrics.jsonl")]
    assert report["reward_curve"]["iterations"] == sum("accuracy/mean" in r for r in metrics) == 5
    assert report["passed"] and "RESULT: PASS" in proc.stdout
    assert "rl 5/5 | rollout " in proc.stdout  # the per-phase line (logs get one per iteration)
    assert os.path.exists(out / "rl" / "curves.png") and os.path.exists(out / "report.md")

    again = _tiny(out, "--min-z=1e9")  # nothing re-runs; now the checks cannot hold
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("already complete, skipped") == 5
    assert "RESULT: FAIL" in again.stdout


def test_the_moe_variant_gives_every_training_and_evaluation_stage_its_model(monkeypatch):
    """`k15 tiny --model moe`: the MoE model's overrides reach the sft, rl and eval stages before the
    user's own, and the run gets its own folder; the resolved recipe is a valid MoE config."""
    from k15_megatron.config import load_config
    from k15_megatron.jobs.tiny import EXAMPLES, MODELS, _parse_args

    monkeypatch.delenv("K15_RUNS", raising=False)
    args = _parse_args(["--model", "moe", "--rl", "rl.iterations=3"])
    assert args.out == os.path.join("runs", "tiny-arith-moe")
    moe = MODELS["moe"]["every"]
    assert args.sft == moe and args.eval == moe + ["rollout.tensor_parallel_size=2"]
    assert args.rl == moe + ["rollout.tensor_parallel_size=2", "rl.iterations=3"]
    cfg = load_config(str(EXAMPLES / "tiny_arith_rl.yaml"), args.rl + ["model.init_from=null"])
    assert (cfg.model.family, cfg.model.num_moe_experts, cfg.parallel.expert) == ("qwen3_moe", 8, 2)
    assert cfg.rollout.tensor_parallel_size == 2
    assert _parse_args([]).out == os.path.join("runs", "tiny-arith") and _parse_args([]).sft == []


def test_the_vision_task_writes_image_data_and_a_vl_model_that_every_stage_accepts(tmp_path, monkeypatch):
    """`k15 tiny --task vision`: the task's name and its data overrides are told apart (a second
    name, an unknown one or --model moe are refused); its data and model stages write image
    records and a tiny Qwen2-VL folder, and skip themselves on a re-run; each stage's recipe, with
    the overrides `k15 tiny` gives it, passes that job's pre-start check on them (the records
    read through the model's processor, which maps the white background to 0). The full-size run
    is measured by `k15 tiny --task vision` (docs/tiny_vision.md), not here."""
    from k15_megatron.config import load_config
    from k15_megatron.data.jsonl import read_jsonl
    from k15_megatron.jobs.preflight import pre_start_errors
    from k15_megatron.jobs.tiny import EXAMPLES, Stages, _data_stage, _model_stage, _parse_args, _task_config

    monkeypatch.delenv("K15_RUNS", raising=False)
    args = _parse_args(["--task", "num_eval=6", "--task", "vision", "--task", "font_size=20"])
    assert (args.task_name, args.out) == ("vision", os.path.join("runs", "tiny-vision"))
    assert args.task[-2:] == ["num_eval=6", "font_size=20"] and args.sft == []
    for bad in (["--task", "vision", "--task", "arithmetic"], ["--task", "pictures"], ["--task", "vision", "--model", "moe"]):
        with pytest.raises(SystemExit):
            _parse_args(bad)
    task = _task_config("vision", 4, ["num_sft=12", "num_train=8", "num_eval=6", "font_size=20"])
    assert (task.task.seed, task.task.num_sft, task.task.num_eval, task.font_size) == (4, 12, 6, 20)

    out = tmp_path / "tiny"
    stages = Stages(str(out), fresh=False)
    data, model = str(out / "data"), str(out / "model")
    _data_stage(stages, "vision", task, data)
    _model_stage(stages, 4, model)
    assert set(stages.seconds) == {"data", "model"}
    records = read_jsonl(os.path.join(data, "eval.jsonl"))
    assert len(records) == 6 and all(os.path.exists(os.path.join(data, r["images"][0])) for r in records)
    assert json.load(open(os.path.join(model, "config.json")))["model_type"] == "qwen2_vl"
    from transformers import AutoProcessor

    from k15_megatron.data.visual_arithmetic import render_expression

    pixels = AutoProcessor.from_pretrained(model).image_processor(images=[render_expression("47+8")],
                                                                   return_tensors="pt")["pixel_values"]
    assert pixels.max() == 0 and pixels.min() < -0.9  # the white background is 0, black ink -1
    again = Stages(str(out), fresh=False)
    _data_stage(again, "vision", task, data)
    _model_stage(again, 4, model)
    assert again.rerun is False  # both were complete with the same inputs

    common = [f"model.hf_path={model}", "seed=4"]
    stage_overrides = {
        "sft": [f"data.train_path={data}/sft.jsonl"],
        "rl": [f"data.train_path={data}/train.jsonl", "model.init_from=null"],
        "eval": [f"data.eval_path={data}/eval.jsonl", "model.init_from=null",
                 f"eval.output={tmp_path}/e.json", f"eval.greedy_output={tmp_path}/g.json"]}
    for job, overrides in stage_overrides.items():
        cfg = load_config(str(EXAMPLES / f"tiny_vision_{job}.yaml"), common + overrides, environ={})
        errors, _ = pre_start_errors(cfg, job=job)
        assert errors == [], (job, errors)


@pytest.mark.parametrize("argv, message", [
    (["--task", "vision", "--task", "text_sft=-5"], "text_sft=-5 must be >= 0"),
    (["--task", "vision", "--task", "num_sft=-5"], "num_sft, num_train and num_eval must be >= 0"),
    (["--task", "text_sft=5"], "apply to --task vision only"),
    (["--task", "vision", "--task", "text_sft=abc"], "bad --task override text_sft=abc"),
    (["--task", "vision", "--rl", "rl.iterations=2"], "needs at least 5 RL iterations"),
    (["--rl", "rl.iterationz=3"], "did you mean 'rl.iterations'"),
])
def test_bad_input_stops_before_any_stage(tmp_path, argv, message):
    """A bad task override or an RL run too short for the report's trend is refused naming the key,
    before any stage runs or the run folder is made."""
    from k15_megatron.jobs.tiny import _parse_args, run_pipeline

    out = tmp_path / "tiny"
    args = _parse_args(argv + ["--out", str(out)])
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_pipeline(args)
    assert not out.exists()


def test_a_finished_command_stage_runs_again_when_its_recipe_or_a_default_changes(tmp_path, capsys):
    from k15_megatron.jobs.tiny import Stages

    base, recipe = tmp_path / "base.yaml", tmp_path / "recipe.yaml"
    tiny = os.path.join(REPO_ROOT, "examples", "tiny_arith.yaml")
    base.write_text(f"defaults: [{tiny}]\noptim:\n  lr: 1.0e-3\n")
    recipe.write_text("defaults: [base.yaml]\nseed: 3\n")
    args = ["config", "show", str(recipe), "optim.train_iters=7"]

    def ran(stages_out):
        stages = Stages(str(stages_out), fresh=False)
        stages.run_command("show", args)
        return "already complete" not in capsys.readouterr().out

    out = tmp_path / "tiny"
    assert ran(out) and not ran(out)  # the real `k15 config show`, then skipped
    base.write_text(f"defaults: [{tiny}]\noptim:\n  lr: 2.0e-3\n")  # a default changed, the command did not
    assert ran(out) and not ran(out)
    recipe.write_text("defaults: [base.yaml]\nseed: 4\n")
    assert ran(out)
