"""``k15 tiny``: the built-in tiny default, end to end, and the evidence that RL did the learning.

The README's main job. Every stage is the real command a user would type, run in its own
process group with the recipes ``examples/tiny_arith_*.yaml`` (docs/tiny_task.md has the design):

1. ``data``: the arithmetic task (:mod:`k15_megatron.data.arithmetic`): SFT demonstrations
   (30% end in one plausible slip), RL-train prompts and 1,000 held-out eval prompts;
2. ``sft``: ``k15 sft`` from random weights;
3. ``eval-sft``: ``k15 eval`` of the SFT checkpoint with 8 samples at temperature 1 and, in the
   same start, greedily (``eval.greedy_output``);
4. ``rl``: ``k15 rl`` from the SFT checkpoint;
5. ``eval-rl``: the same two evaluations of the RL checkpoint;
6. ``report``: paired before/after comparisons on the same prompts (gain, standard error, z) and
   the training-reward curve, written to ``OUT/report.json`` and ``OUT/report.md``, plus
   ``k15 plot`` of the RL run.

A stage whose output is complete and whose command and resolved recipe are unchanged is not
run again, so an interrupted ``k15 tiny`` continues where it stopped; a stage whose command or
recipe changed, and every stage after one that ran, starts over in fresh folders (``--fresh``
starts every stage over). The exit status is 0 only when the report's checks hold: the paired gain in sampled pass@1 (the mean success of 8
samples at temperature 1, the expected reward RL maximises) exceeds ``--min-z`` standard errors
and the training reward rises by more than ``--min-z`` standard errors of its slope. The greedy
pass@1 gain is reported beside it, with its own z, but not required.

``--model moe`` runs the same pipeline with a mixture-of-experts model in place of the dense
one (:data:`MODELS`: a tiny Qwen3-MoE, 8 experts per layer, top-2 routing, each expert half the
dense model's SwiGLU width so a token's active width is the same, the router's load-balancing
loss at 0.01) under expert parallelism EP=2 on the two processes, with one vLLM engine over both
(``rollout.tensor_parallel_size=2``), into ``runs/tiny-arith-moe``.

``--task vision`` runs the visual tiny default (:data:`TASKS`), into ``runs/tiny-vision``: the
same problems drawn into images (:mod:`k15_megatron.data.visual_arithmetic`: one 28-pixel cell
per character, one vision token each; the prompt text no longer holds the expression; the SFT
set also holds text demonstrations of the same task), a
``model`` stage after ``data`` that writes a random tiny Qwen2-VL with its processor
(:data:`VISION_MODEL`: the language model of the text default's size and a 2-block vision
tower; the processor maps the white background to 0) to ``OUT/model``, every later stage on
that folder (``model.hf_path``) with the recipes ``examples/tiny_vision_*.yaml``, and the same
report (docs/tiny_vision.md has the design and its calibration). A ``--task`` value without ``=`` names the
task (``arithmetic``, the default, or ``vision``); one with ``=`` overrides a field of the
task's data (:class:`~k15_megatron.data.arithmetic.ArithmeticTaskConfig`, and for ``vision`` also
``cell``, ``font_size`` and ``text_sft`` of :class:`~k15_megatron.data.visual_arithmetic.VisualArithmeticConfig`).

``--task long2short`` runs the long2short demonstration instead, into ``runs/tiny-long2short``
(:mod:`k15_megatron.jobs.tiny_long2short`, docs/tiny_long2short.md): a "long" SFT model whose
demonstrations carry redundant check lines, then model merging, shortest rejection sampling,
DPO and long2short RL from it, each evaluated on the same held-out prompts; ``--sample`` and
``--dpo`` override its ``k15 sample`` and ``k15 dpo`` stages (``--sft`` reaches its three SFT
stages), and ``--min-z`` does not apply (its check is in that module).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

from k15_megatron.jobs.eval_output import samples_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# One intra-op thread per process and no OpenMP core binding: on a small shared machine vLLM's
# CPU engine was 5-10x faster this way (docs/tiny_task.md); setdefault keeps a user's choice.
# How much the stages print is set by k15_megatron/jobs/verbosity.py (--verbose carries through).
STAGE_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false"}

# The two evaluations of each checkpoint, run by one `k15 eval` start: eval.output (8 samples at
# temperature 1, tiny_arith_eval.yaml) and eval.greedy_output.
EVALS = ("greedy", "sampled")

# The model variants: overrides the stages get before the user's own ("every": sft, rl and eval;
# "generating": rl and eval, which run vLLM; on CPU vLLM cannot split an MoE model's requests
# over two engine replicas, so the MoE variant runs one engine over both ranks).
MODELS = {
    "dense": {"every": [], "generating": []},
    "moe": {"every": ["model.family=qwen3_moe", "model.num_moe_experts=8", "model.moe_router_topk=2",
                      "model.moe_ffn_hidden_size=256", "model.moe_aux_loss_coeff=0.01", "parallel.expert=2"],
            "generating": ["rollout.tensor_parallel_size=2"]},
}


# The tasks: the recipes' prefix (examples/<prefix>_{sft,rl,eval}.yaml), the run folder's name, the
# report's title and the task-data overrides the task applies before the user's own. The visual
# task keeps fewer distinct image demonstrations (every training process holds their pixels and
# runs the processor on each, ~5 ms apiece) and mixes text demonstrations of the same problems
# into its SFT set, so that it sees as many distinct calculations as the text default; its
# problems have 2 to 4 operands (levels 1-3; with up to 6 the SFT model solved 4% of them,
# docs/tiny_vision.md).
TASKS = {
    "arithmetic": {"recipes": "tiny_arith", "folder": "tiny-arith", "title": "held-out arithmetic", "data": []},
    "vision": {"recipes": "tiny_vision", "folder": "tiny-vision",
               "data": ["num_sft=8000", "text_sft=32000", "max_operands=4"],
               "title": "held-out arithmetic drawn into images"},
    "long2short": {"recipes": "tiny_long2short", "folder": "tiny-long2short", "data": ["max_operands=4", "verify_share=0.7"],
                   "title": "long2short on held-out arithmetic"},
}
# Stage overrides only the long2short pipeline has (its k15 sample and k15 dpo stages).
LONG2SHORT_STAGES = ("sample", "dpo")

# The visual task's model (transformers config overrides of models/tiny_vl.py's Qwen2-VL): the
# language model of the text default (4 layers, width 128, MLP 512, 4 heads with 4 key/value heads),
# with its rotary frequencies split so that the language model can tell the image's columns apart.
# M-RoPE gives the (temporal, height, width) positions the highest, middle and lowest frequencies in
# mrope_section's proportions; an image token differs from its neighbours in the width position only.
# With models/tiny_vl.py's [4, 6, 6] at rope_theta 1e6 the width frequencies turn by at most 1.8e-4
# rad per column, too little to tell neighbouring characters apart; [1, 1, 14] at 1e4 turns them by
# up to 0.32 rad per column (computed, not compared in a run: docs/tiny_vision.md).
VISION_MODEL = {"num_hidden_layers": 4, "intermediate_size": 512, "num_key_value_heads": 4,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 14]}}


IMAGE_NORMALIZATION = (1.0, 1.0, 1.0)
"""The visual task's image processor's ``image_mean`` and ``image_std`` (see :func:`_model_stage`)."""


def _parse_args(argv):
    from k15_megatron.jobs.help_text import description, details

    parser = argparse.ArgumentParser(prog="k15 tiny", description=description(__doc__), epilog=details(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="dense",
                        help="dense (default) or moe: a tiny Qwen3-MoE under expert parallelism EP=2")
    parser.add_argument("--out", default=None,
                        help="run folder (default: $K15_RUNS/tiny-arith, tiny-arith-moe with --model moe, "
                             "tiny-vision or tiny-long2short with that --task; K15_RUNS defaults to runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task data and of every stage")
    parser.add_argument("--fresh", action="store_true", help="run every stage again")
    parser.add_argument("--min-z", type=float, default=3.0, help="required paired gain in standard errors")
    from k15_megatron.jobs.verbosity import add_flag

    add_flag(parser)
    parser.add_argument("--task", action="append", default=[], metavar="NAME|KEY=VALUE",
                        help=f"the task, one of {', '.join(TASKS)} (default arithmetic; vision: the problems "
                             "drawn into images, a tiny Qwen2-VL; long2short: the long2short methods), "
                             "or an override of its data (repeatable)")
    for stage in ("sft", "rl", "eval") + LONG2SHORT_STAGES:
        parser.add_argument(f"--{stage}", action="append", default=[], metavar="KEY=VALUE",
                            help=f"override for the {stage} stage (repeatable)"
                                 + (" (--task long2short)" if stage in LONG2SHORT_STAGES else ""))
    args = parser.parse_args(argv)
    names = {value for value in args.task if "=" not in value}
    if len(names) > 1 or not names <= set(TASKS):
        parser.error(f"--task {' '.join(sorted(names))}: name one task of {', '.join(TASKS)} "
                     "(a value with '=' overrides a field of its data)")
    args.task_name = names.pop() if names else "arithmetic"
    if args.task_name != "arithmetic" and args.model != "dense":
        parser.error(f"--task {args.task_name} runs the dense model only; drop --model {args.model}")
    for stage in LONG2SHORT_STAGES:
        if getattr(args, stage) and args.task_name != "long2short":
            parser.error(f"--{stage} overrides a stage of --task long2short only")
    args.task = TASKS[args.task_name]["data"] + [value for value in args.task if "=" in value]
    if args.out is None:
        name = TASKS[args.task_name]["folder"] + ("" if args.model == "dense" else f"-{args.model}")
        args.out = os.path.join(os.environ.get("K15_RUNS", "runs"), name)
    every, generating = MODELS[args.model]["every"], MODELS[args.model]["generating"]
    args.sft, args.rl, args.eval = every + args.sft, every + generating + args.rl, every + generating + args.eval
    return args


# -- stages ---------------------------------------------------------------------------------------
class Stages:
    """Runs the stages of one ``k15 tiny`` folder, skipping those already complete."""

    def __init__(self, out: str, *, fresh: bool):
        self.out = os.path.abspath(out)
        self.rerun = fresh
        """Run every remaining stage from scratch: set by --fresh and once any stage has run
        (a later stage's output depends on the earlier ones)."""
        self.seconds: Dict[str, float] = {}
        if os.path.isdir(self.out) and os.listdir(self.out) and not os.path.isdir(os.path.join(self.out, "stages")):
            # Only a k15 tiny folder (it has stages/) is continued; anything else may be a user's.
            raise SystemExit(f"k15 tiny: --out {self.out} is a non-empty folder that k15 tiny did not "
                             "make; choose a new or empty folder")
        os.makedirs(os.path.join(self.out, "stages"), exist_ok=True)

    def run(self, name: str, signature: str, work, *, outputs: Sequence[str] = ()) -> bool:
        """Run ``work()`` as stage ``name`` unless its marker records the same ``signature`` and
        no earlier stage ran (then only its recorded seconds are taken); a finished stage writes
        its marker. ``outputs``: the stage's folders and files under OUT; a stage that runs
        again (changed command, --fresh, an earlier stage re-run) first removes them, so its
        job starts fresh instead of resuming a run made with other inputs. A stage without a
        marker (interrupted) keeps them and its job resumes. Returns whether the stage ran."""
        path = os.path.join(self.out, "stages", f"{name}.done")
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
            if record.get("signature") == signature and not self.rerun:
                self.seconds[name] = record["seconds"]
                print(f"== {name}: already complete, skipped ({path})", flush=True)
                return False
            os.unlink(path)
            self._remove(outputs)
        elif self.rerun:
            self._remove(outputs)
        self.rerun = True
        start = time.perf_counter()
        work()
        self.seconds[name] = time.perf_counter() - start
        with open(path, "w") as f:
            json.dump({"signature": signature, "seconds": self.seconds[name]}, f)
        return True

    def _remove(self, outputs: Sequence[str]) -> None:
        """Delete a stage's own outputs (paths inside OUT only: OUT is a k15 tiny folder)."""
        for target in outputs:
            target = os.path.abspath(target)
            assert target.startswith(self.out + os.sep), f"{target} is not inside {self.out}"
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.unlink(target)

    def run_command(self, name: str, args: Sequence[str], *, outputs: Sequence[str] = ()) -> None:
        """Run ``k15 <args>`` as stage ``name`` (skipped when done with the same
        :func:`command_signature`; ``outputs`` as in :meth:`run`)."""
        signature = command_signature(args)

        line = shlex.join(args)

        def work():
            print(f"== {name}: k15 {line}", flush=True)
            env = dict(os.environ)
            for key, value in STAGE_ENV.items():
                env.setdefault(key, value)
            status = subprocess.call([sys.executable, "-m", "k15_megatron.cli", *args], env=env)
            if status != 0:
                raise SystemExit(f"k15 tiny: stage {name!r} failed with exit status {status}: k15 {line}")

        if self.run(name, signature, work, outputs=outputs):
            print(f"== {name}: done in {self.seconds[name]:.0f} s", flush=True)


def command_signature(args: Sequence[str]) -> str:
    """What decides whether a finished ``k15 <args>`` stage still stands: the command line and,
    when an argument is a YAML recipe, the configuration it resolves to with the command's
    ``key=value`` overrides (:func:`~k15_megatron.config.loader.load_config`), so that an edited
    recipe, or a file in its ``defaults``, runs the stage again."""
    signature = shlex.join(args)
    recipes = [a for a in args if a.endswith((".yaml", ".yml"))]
    if recipes:
        from k15_megatron.config.loader import load_config, to_yaml

        signature += "\n" + to_yaml(load_config(recipes[0], [a for a in args if "=" in a and not a.startswith("-")]))
    return signature


def _task_config(name: str, seed: int, overrides: List[str]):
    """The task data's config: ArithmeticTaskConfig, or for ``vision`` VisualArithmeticConfig
    (its own fields ``cell``, ``font_size`` and ``text_sft``; every other key is one of its
    ``task``'s). SystemExit naming the key for an unknown key, a bad value or an invalid field."""
    from omegaconf import OmegaConf

    from k15_megatron.data.arithmetic import ArithmeticTaskConfig
    from k15_megatron.data.visual_arithmetic import VisualArithmeticConfig, visual_config_errors

    base = ArithmeticTaskConfig(seed=seed)
    defaults = TASKS[name]["data"]
    shown = [o for o in overrides if o not in defaults] or overrides
    if name == "vision":
        base = VisualArithmeticConfig(task=base)
        own = {f for f in VisualArithmeticConfig.__dataclass_fields__ if f != "task"}
        overrides = [o if o.split("=", 1)[0] in own else f"task.{o}" for o in overrides]
    try:
        merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(overrides)))
    except Exception as exc:  # OmegaConf names the bad key
        only = "" if name == "vision" else " (text_sft, cell and font_size apply to --task vision only)"
        raise SystemExit(f"k15 tiny: bad --task override {' '.join(shown)}{only}: {exc}") from exc
    errors = visual_config_errors(merged) if name == "vision" else merged.validate()
    if errors:
        raise SystemExit(f"k15 tiny: --task {' '.join(shown)}: " + "; ".join(errors))
    return merged


def _rl_iterations(recipe: str, overrides: List[str]) -> int:
    """``rl.iterations`` of the RL stage: its recipe (with its defaults) and ``overrides``, loaded
    without the cross-field checks the stage itself runs. SystemExit for a key or value the
    loader refuses."""
    from k15_megatron.config import load_config

    try:
        return load_config(recipe, overrides, check=False).rl.iterations
    except ValueError as exc:
        raise SystemExit(f"k15 tiny: --rl: {exc}") from exc


def _data_stage(stages: Stages, name: str, task, data_dir: str) -> None:
    """The task's files in ``data_dir`` (and, for ``vision``, their images)."""
    from dataclasses import asdict

    from k15_megatron.data.arithmetic import write_task_files
    from k15_megatron.data.visual_arithmetic import write_visual_task_files

    write = write_visual_task_files if name == "vision" else write_task_files

    def work():
        print(f"== data: the {name} task's files into {data_dir}", flush=True)
        write(task, data_dir)

    if stages.run("data", json.dumps(asdict(task), sort_keys=True), work, outputs=[data_dir]):
        print(f"== data: done in {stages.seconds['data']:.0f} s", flush=True)


def _model_stage(stages: Stages, seed: int, model_dir: str) -> None:
    """The random tiny Qwen2-VL of the visual task (:data:`VISION_MODEL`) in ``model_dir``."""
    from k15_megatron.models.tiny_vl import save_tiny_qwen2_vl

    def work():
        from transformers import AutoProcessor

        print(f"== model: a random tiny Qwen2-VL {VISION_MODEL} in {model_dir}", flush=True)
        save_tiny_qwen2_vl(model_dir, seed=seed, **VISION_MODEL)
        # Pixels normalised to (x - 1) / 1 after the 1/255 rescale: the white background is 0, so
        # a vision token is a function of its glyph's ink alone. With the processor's default
        # (CLIP) mean and std the background dominated every token (cosine 0.86-0.96 between
        # different characters' tokens at initialisation) and SFT learned to ignore the images.
        processor = AutoProcessor.from_pretrained(model_dir)
        processor.image_processor.image_mean = processor.image_processor.image_std = list(IMAGE_NORMALIZATION)
        processor.save_pretrained(model_dir)

    signature = {"seed": seed, "normalization": IMAGE_NORMALIZATION, **VISION_MODEL}
    if stages.run("model", json.dumps(signature, sort_keys=True), work, outputs=[model_dir]):
        print(f"== model: done in {stages.seconds['model']:.0f} s", flush=True)


def run_pipeline(args) -> dict:
    """All stages (see the module docstring); returns the report."""
    from k15_megatron.jobs.tiny_report import MIN_TREND_POINTS

    task_name = args.task_name
    recipes = TASKS[task_name]["recipes"]
    task = _task_config(task_name, args.seed, args.task)  # bad input stops here, before any stage
    iterations = _rl_iterations(str(EXAMPLES / f"{recipes}_rl.yaml"), args.rl)
    if iterations < MIN_TREND_POINTS:
        raise SystemExit(f"k15 tiny: rl.iterations={iterations}: the report's training-reward trend needs at "
                         f"least {MIN_TREND_POINTS} RL iterations")
    stages = Stages(args.out, fresh=args.fresh)
    out = stages.out
    data_dir = os.path.join(out, "data")
    _data_stage(stages, task_name, task, data_dir)
    model = []  # the overrides that point every later stage at the task's model
    if task_name == "vision":
        _model_stage(stages, args.seed, os.path.join(out, "model"))
        model = [f"model.hf_path={out}/model"]
    seed = f"seed={args.seed}"
    sft_ckpt = os.path.join(out, "sft", "checkpoints")
    rl_ckpt = os.path.join(out, "rl", "checkpoints")
    stages.run_command("sft", ["sft", str(EXAMPLES / f"{recipes}_sft.yaml"), seed, f"run_dir={out}/sft", *model,
                               f"data.train_path={data_dir}/sft.jsonl", *args.sft], outputs=[f"{out}/sft"])
    eval_files = {}
    for stage_model, ckpt in (("sft", sft_ckpt), ("rl", None)):
        if stage_model == "rl":
            stages.run_command("rl", ["rl", str(EXAMPLES / f"{recipes}_rl.yaml"), seed, f"run_dir={out}/rl", *model,
                                      f"model.init_from={sft_ckpt}", f"data.train_path={data_dir}/train.jsonl",
                                      *args.rl], outputs=[f"{out}/rl"])
            ckpt = rl_ckpt
        outputs = {mode: os.path.join(out, "eval", f"{stage_model}_{mode}.json") for mode in EVALS}
        stages.run_command(f"eval-{stage_model}",
                           ["eval", str(EXAMPLES / f"{recipes}_eval.yaml"), seed, f"run_dir={out}/eval/{stage_model}",
                            *model, f"model.init_from={ckpt}", f"data.eval_path={data_dir}/eval.jsonl",
                            f"eval.output={outputs['sampled']}", f"eval.greedy_output={outputs['greedy']}",
                            *args.eval],
                           outputs=[f"{out}/eval/{stage_model}"] + [path for output in outputs.values()
                                                                    for path in (output, samples_file(output))])
        eval_files.update({(stage_model, mode): output for mode, output in outputs.items()})
    subprocess.call([sys.executable, "-m", "k15_megatron.cli", "plot", os.path.join(out, "rl")])
    report = build_report(eval_files, os.path.join(out, "rl", "metrics.jsonl"), stages.seconds, min_z=args.min_z)
    report["command"] = "k15 tiny " + shlex.join(args.argv)
    report["model"] = args.model
    report["task"] = task_name
    from k15_megatron.jobs.tiny_report import save_report

    save_report(out, report, render_report(report))
    print(f"tiny: wrote report.json, report.md, rl/curves.png, eval/*.json, eval/*_samples.jsonl and the "
          f"sft/ and rl/ runs in {out}", flush=True)
    return report


# -- the report -------------------------------------------------------------------------------------
def build_report(eval_files: dict, metrics_path: str, seconds: dict, *, min_z: float) -> dict:
    """Paired comparisons of the evaluations and the reward curve (:mod:`k15_megatron.jobs.tiny_report`)."""
    from k15_megatron.jobs.tiny_report import paired_comparison, reward_curve

    evals = {}
    for key, path in eval_files.items():
        with open(path) as f:
            evals[key] = json.load(f)
    comparisons = {mode: paired_comparison(evals[("sft", mode)], evals[("rl", mode)]) for mode in EVALS}
    curve = reward_curve(metrics_path)
    # The bar is on sampled pass@1, the expected reward RL optimizes; greedy decoding is reported
    # beside it (from an SFT start that already decodes 0.9 greedily it may move < 3 SE).
    checks = {f"sampled pass@1 gain > {min_z:g} SE": comparisons["sampled"]["z"] > min_z,
              f"training reward rises (slope > {min_z:g} SE)": curve["slope_z"] > min_z}
    return {"comparisons": comparisons, "reward_curve": curve, "seconds": seconds,
            "total_seconds": sum(seconds.values()), "checks": checks, "passed": all(checks.values())}


def render_report(report: dict) -> str:
    model = "" if report.get("model", "dense") == "dense" else f" ({report['model']} model)"
    title = TASKS[report.get("task", "arithmetic")]["title"]
    lines = ["", f"# k15 tiny{model}: SFT -> RL on {title} (paired, same prompts)", ""]
    lines.append("| pass@1 | SFT | RL | gain (points) | SE | z |")
    lines.append("|---|---|---|---|---|---|")
    for mode, c in report["comparisons"].items():
        lines.append(f"| {mode} ({c['num_prompts']} prompts x {c['num_samples']}) | {c['before']:.3f} | "
                     f"{c['after']:.3f} | {100 * c['gain']:+.1f} | {100 * c['se']:.1f} | {c['z']:.1f} |")
    extra = [f"{k} {c['before_extra'][k]:.3f} -> {c['after_extra'][k]:.3f}"
             for c in report["comparisons"].values() for k in c["before_extra"]]
    if extra:
        lines += ["", "Also: " + "; ".join(extra)]
    curve = report["reward_curve"]
    lines += ["", f"Training reward (task accuracy per iteration): first fifth {curve['first_fifth']:.3f} -> "
                  f"last fifth {curve['last_fifth']:.3f}; slope {curve['slope_per_iteration']:+.4f} "
                  f"per iteration ({curve['slope_z']:.1f} SE) over {curve['iterations']} iterations.", ""]
    stage_times = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
    lines += [f"Wall time: {report['total_seconds'] / 60:.1f} min ({stage_times}).", ""]
    for check, ok in report["checks"].items():
        lines.append(f"- [{'x' if ok else ' '}] {check}")
    lines += ["", "RESULT: " + ("PASS" if report["passed"] else "FAIL"), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    args.argv = argv
    if args.task_name == "long2short":
        from k15_megatron.jobs.tiny_long2short import run_pipeline as run_long2short

        return 0 if run_long2short(args)["passed"] else 1
    report = run_pipeline(args)
    return 0 if report["passed"] else 1
