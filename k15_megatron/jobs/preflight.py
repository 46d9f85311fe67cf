"""What each job reads, and the checks of it that run before any process starts.

``k15 sft|rl|eval`` (through :func:`job_checks`, the ``job_errors`` hook of
:func:`k15_megatron.jobs.launch.launch`) and ``k15 config show --job NAME`` run
:func:`pre_start_errors` on the validated config, in the launching process, before torchrun,
torch.distributed, Megatron or vLLM start. It checks, listing every problem at once:

* the job's own config rules (:data:`JOBS`), a training precision this machine can run, and
  the lengths against the model's context
  (max_position_embeddings): ``data.seq_length`` for SFT, ``rollout.max_response_tokens``
  against ``rollout.max_model_len`` for the jobs that generate;
* the tokenizer: found where :mod:`k15_megatron.models.tokenizer` says, no larger than the
  model's vocabulary, and its chat template (``data.chat_template``; a tokenizer without one
  gets the built-in default and a one-line warning, :mod:`k15_megatron.data.formatting`);
* for ``k15 eval``: that ``eval.output`` and its samples file are new or its own earlier results
  (:mod:`k15_megatron.jobs.eval_output`);
* every data file the job reads: it exists, holds records, each line parses and carries the
  required fields in accepted types (:mod:`k15_megatron.data.jsonl`), and the examples or
  prompts fit the configured lengths, dropped with a count or refused by file:line
  (``data.too_long``); SFT records and RL/eval prompts with images are opened and run through
  the model's processor (:mod:`k15_megatron.data.images`), so a missing or unreadable image, or
  an image count its prompt does not match, is refused by file:line;
* a vision-language model only for the jobs that run one (``k15 sft``, ``k15 rl``, ``k15 eval``;
  :data:`JOBS`), and only in the layouts it is built for (no context or sequence parallelism:
  :func:`_vision_layout_errors`).

The data checks build the same :class:`~k15_megatron.data.sft_set.SftSet` /
:class:`~k15_megatron.data.prompt_set.PromptSet` the jobs train on, so the ranks never meet a
problem this check let through. The tokenizer is loaded with transformers only (no model,
nothing written to disk). Warnings are printed once, by the process of global rank 0.

The launching ``k15`` process records a passed check in the environment
(:data:`CHECKED_ENV`: a digest of the resolved config) before it starts torchrun, so the ranks
it starts, which run the same command, skip a second pass over the data; ranks started by
another launcher (srun) run the check themselves.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from k15_megatron.config.model_arch import ModelArch, context_source, resolve_model_arch
from k15_megatron.config.rollout import response_budget_errors
from k15_megatron.config.validate import rl_job_errors, vision_job_errors

SFT_RECORDS, PROMPT_RECORDS, PAIR_RECORDS = "sft", "prompts", "pairs"
CHECKED_ENV = "K15_PRE_START_CHECKED"
"""Environment variable: ``<job>:<digest of the resolved config>`` of a check that passed."""


@dataclass(frozen=True)
class DataRead:
    """One data file a job reads."""

    key: str
    """Field of the ``data`` section holding the path (``train_path``, ``eval_path``)."""
    records: str
    """SFT_RECORDS ({prompt, response}), PROMPT_RECORDS ({prompt, answer, ...}) or PAIR_RECORDS
    (DPO: {prompt, chosen, rejected} or {prompt, responses, correct})."""
    required: bool
    """The job cannot run without it (else it is read when set)."""


@dataclass(frozen=True)
class JobInputs:
    """What a job reads and which config rules are its own."""

    reads: Tuple[DataRead, ...]
    generates: bool
    """Runs the rollout engine (the rollout lengths apply to it)."""
    trains: bool
    """Trains the model (the optimizer's precision rules apply to it)."""
    config_errors: Optional[Callable[[object], List[str]]] = None
    images: bool = False
    """Runs vision-language models (else one is refused: :func:`~k15_megatron.config.validate.vision_job_errors`)."""


JOBS = {
    "sft": JobInputs(reads=(DataRead("train_path", SFT_RECORDS, required=True),), generates=False, trains=True,
                     images=True),
    "rl": JobInputs(reads=(DataRead("train_path", PROMPT_RECORDS, required=True),
                           DataRead("eval_path", PROMPT_RECORDS, required=False)),
                    generates=True, trains=True, config_errors=rl_job_errors, images=True),
    "dpo": JobInputs(reads=(DataRead("train_path", PAIR_RECORDS, required=True),), generates=False, trains=True),
    "curate": JobInputs(reads=(DataRead("train_path", PROMPT_RECORDS, required=True),), generates=True,
                        trains=False, images=True),
    "sample": JobInputs(reads=(DataRead("train_path", PROMPT_RECORDS, required=True),), generates=True,
                        trains=False, images=True),
    "eval": JobInputs(reads=(DataRead("eval_path", PROMPT_RECORDS, required=True),), generates=True,
                      trains=False, images=True),
}
"""The jobs' inputs, by command name (``k15 <name>``)."""


def pre_start_errors(cfg, *, job: str) -> Tuple[List[str], List[str]]:
    """``(errors, warnings)`` of ``job`` on the validated ``cfg`` (see the module docstring);
    one line each, naming the config key or the file and line."""
    inputs = JOBS[job]
    errors = list(inputs.config_errors(cfg)) if inputs.config_errors else []
    errors += _vision_layout_errors(cfg) if inputs.images else vision_job_errors(cfg.model, job=job)
    arch = resolve_model_arch(cfg.model)  # cfg is validated: this succeeds
    length_errors = _length_errors(cfg, arch, generates=inputs.generates, sft=job in ("sft", "dpo"))
    errors += length_errors
    errors += _precision_errors(cfg) + _moe_training_errors(cfg, arch) if inputs.trains else []
    errors += _layer_spec_errors(cfg)
    errors += _rollout_layout_errors(cfg, arch) if inputs.generates else []
    if job == "eval":
        from k15_megatron.jobs.eval_output import output_errors

        errors += output_errors(cfg.eval.output)
        greedy = cfg.eval.greedy_output
        if greedy and os.path.abspath(greedy) == os.path.abspath(cfg.eval.output):
            errors.append(f"eval.greedy_output={greedy} is eval.output too; give the greedy results a file of their own")
        elif greedy:
            errors += output_errors(greedy, key="eval.greedy_output")
    tokenizer, warnings = None, []
    if job == "sft" and cfg.data.micro_batch_tokens is not None:
        warnings.append(f"data.micro_batch_tokens={cfg.data.micro_batch_tokens} is not used by k15 sft (its "
                        "micro-batches are data.micro_batch_size packed rows of data.seq_length tokens); it sets "
                        "the token budget of k15 rl's update and log-prob recompute")
    try:
        tokenizer, warning = _tokenizer(cfg, arch)
        warnings += [warning] if warning else []
    except ValueError as exc:
        errors.append(str(exc))
    for read in inputs.reads:
        path = getattr(cfg.data, read.key)
        if not path:
            if read.required:
                errors.append(f"k15 {job} needs data.{read.key}: a JSONL file of "
                              f"{_RECORD_FORMS[read.records]} "
                              "records (formats: README.md, Your own model and data)")
            continue
        problems, note = _data_problems(cfg, read, path, job=job,
                                        tokenizer=None if length_errors else tokenizer)
        errors += [f"data.{read.key}: {p}" for p in problems]
        warnings += [f"data.{read.key}: {note}"] if note else []
    return errors, warnings


def job_checks(job: str) -> Callable[[object], List[str]]:
    """The ``job_errors`` hook of ``k15 <job>``: :func:`pre_start_errors`, its warnings printed
    to stderr (by global rank 0 only), its errors returned."""

    def check(cfg) -> List[str]:
        from k15_megatron.config.loader import to_yaml

        passed = f"{job}:{hashlib.sha256(to_yaml(cfg).encode()).hexdigest()}"
        if os.environ.get(CHECKED_ENV) == passed:
            return []  # the launching process checked this very config
        errors, warnings = pre_start_errors(cfg, job=job)
        if os.environ.get("RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0":
            for line in warnings:
                print(f"warning: {line}", file=sys.stderr, flush=True)
        if not errors:
            os.environ[CHECKED_ENV] = passed
        return errors

    return check


def _precision_errors(cfg) -> List[str]:
    """bf16/fp16 training needs CUDA: Megatron's mixed-precision optimizer wraps only CUDA
    tensors, so on a machine without a GPU it would fail after start-up."""
    if cfg.precision.dtype == "fp32":
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return [f"precision.dtype={cfg.precision.dtype}: training in {cfg.precision.dtype} needs a GPU (Megatron's "
            "mixed-precision optimizer takes CUDA tensors) and this machine has none; set precision.dtype=fp32"]


def _moe_training_errors(cfg, arch: ModelArch) -> List[str]:
    """Megatron-Core's MoE layer refuses to train under tensor parallelism without sequence
    parallelism (a ValueError at the first training forward); said here, before any rank starts."""
    if arch.is_moe and cfg.parallel.tensor > 1 and not cfg.parallel.sequence_parallel:
        return [f"parallel.tensor={cfg.parallel.tensor} with a mixture-of-experts model ({arch.family}) trains only "
                "with parallel.sequence_parallel=true (Megatron-Core's MoE layer refuses tensor parallelism without "
                "it; sequence parallelism needs Transformer Engine); or split the experts with parallel.expert "
                "and keep parallel.tensor=1"]
    return []


def _rollout_layout_errors(cfg, arch: ModelArch) -> List[str]:
    """The engine layout (:func:`k15_megatron.rollout.build.engine_layout`) before any rank
    starts: ``rollout.tensor_parallel_size`` must divide the world size. And vLLM runs a
    mixture-of-experts model's expert layers across its data-parallel replicas (each MoE forward
    gathers the replicas' tokens, ``all_gatherv``), which vLLM's CPU build does not implement
    (NotImplementedError at the first generated token): on CPU a MoE model needs one engine over
    all ranks. On GPUs the replicas run that exchange (written, not run here)."""
    import torch

    from k15_megatron.config.env import resolve_world_size

    try:
        world, _ = resolve_world_size(cfg.parallel.world_size, os.environ)
    except ValueError:
        return []  # reported by the config's validation
    engine_tp = cfg.rollout.tensor_parallel_size
    if world % engine_tp:
        return [f"rollout.tensor_parallel_size={engine_tp} must divide the world size {world} (each vLLM engine "
                "replica spans rollout.tensor_parallel_size ranks)"]
    if not arch.is_moe or world == engine_tp or torch.cuda.is_available():
        return []
    return [f"rollout.tensor_parallel_size={engine_tp} runs {world // engine_tp} vLLM replicas of a "
            f"mixture-of-experts model ({arch.family}); their expert layers exchange tokens between the replicas, "
            f"which vLLM's CPU build cannot do: set rollout.tensor_parallel_size={world} (one engine over all "
            "ranks) on a machine without a GPU"]


def _layer_spec_errors(cfg) -> List[str]:
    """Sequence parallelism exists only in Transformer Engine's layer spec (Megatron-Core's local
    norm asserts at model build). Checked here, where the job runs, not by config validation:
    a cluster recipe is still shown and planned on a login node without TE."""
    from k15_megatron.config.env import have_transformer_engine

    if cfg.parallel.sequence_parallel and not have_transformer_engine():
        return ["parallel.sequence_parallel=true needs Transformer Engine's layer spec (Megatron-Core's local norm "
                "refuses sequence parallelism) and transformer_engine is not importable on this machine; run where "
                "it is installed or set parallel.sequence_parallel=false"]
    return []


def _length_errors(cfg, arch: ModelArch, *, generates: bool, sft: bool) -> List[str]:
    context, source = arch.max_position_embeddings, context_source(cfg.model)
    errors = []
    if sft and cfg.data.seq_length > context:
        errors.append(f"data.seq_length={cfg.data.seq_length} exceeds the model's context of {context} tokens "
                      f"({source}); set data.seq_length to at most {context}")
    if generates:
        note = " (the model's context)" if cfg.rollout.max_model_len == context else ""
        errors += response_budget_errors(cfg.rollout, context_note=note)
    return errors


def _tokenizer(cfg, arch: ModelArch):
    """``(tokenizer, warning)``: the run's tokenizer (vocabulary checked) with its chat
    template chosen; ValueError naming the key or folder otherwise."""
    from k15_megatron.data.formatting import use_chat_template
    from k15_megatron.models.tokenizer import load_tokenizer

    init_checkpoint = None
    if cfg.model.init_from:
        if not os.path.exists(cfg.model.init_from):
            raise ValueError(f"model.init_from={cfg.model.init_from!r}: no such checkpoint or run directory "
                             f"(relative paths start at {os.getcwd()}); run the stage that writes it first, or "
                             "set model.init_from=null to start from model.hf_path")
        from k15_megatron.checkpoint.run_ckpt import resolve_checkpoint_dir

        init_checkpoint = resolve_checkpoint_dir(cfg.model.init_from)
    tokenizer = load_tokenizer(cfg.model, vocab_size=arch.vocab_size, init_checkpoint=init_checkpoint)
    return tokenizer, use_chat_template(tokenizer, cfg.data.chat_template)


def _vision_layout_errors(cfg) -> List[str]:
    """A vision-language model is built without context or sequence parallelism and with vision
    heads divisible by the tensor-parallel size (:func:`k15_megatron.models.qwen2_vl.build_qwen2_vl_model`
    refuses the rest after start-up); said here, naming the key, before any rank starts."""
    from k15_megatron.config.model_arch import resolve_vision_arch

    try:
        vision = resolve_vision_arch(cfg.model)
    except ValueError:
        return []  # reported by the config's validation
    if vision is None:
        return []
    errors = []
    if vision.num_heads % cfg.parallel.tensor:
        errors.append(f"parallel.tensor={cfg.parallel.tensor} does not divide the vision tower's {vision.num_heads} "
                      f"attention heads ({cfg.model.hf_path}/config.json); choose a divisor of {vision.num_heads}")
    if cfg.parallel.context > 1:
        errors.append(f"parallel.context={cfg.parallel.context}: context parallelism is not supported with a "
                      f"vision-language model ({vision.family}); set parallel.context=1")
    if cfg.parallel.sequence_parallel:
        errors.append(f"parallel.sequence_parallel=true is not supported with a vision-language model "
                      f"({vision.family}); set parallel.sequence_parallel=false")
    return errors


def data_processor(cfg):
    """The processor image records (SFT examples, RL/eval prompts) are read with: a
    vision-language model's (``AutoProcessor`` of the run's tokenizer folder,
    :func:`k15_megatron.data.images.load_processor`), None for a text model. ValueError naming
    the folder when a vision-language model's has none."""
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.data.images import load_processor
    from k15_megatron.models.tokenizer import tokenizer_folder

    if resolve_vision_arch(cfg.model) is None:
        return None
    init_checkpoint = None
    if cfg.model.init_from:
        from k15_megatron.checkpoint.run_ckpt import resolve_checkpoint_dir

        init_checkpoint = resolve_checkpoint_dir(cfg.model.init_from)
    return load_processor(tokenizer_folder(cfg.model, init_checkpoint=init_checkpoint))


sft_processor = data_processor
"""The name ``k15 sft`` imports :func:`data_processor` by."""


def _data_problems(cfg, read: DataRead, path: str, *, job: str, tokenizer) -> Tuple[List[str], str]:
    """``(problems, filter note)`` of one data file: records only when ``tokenizer`` is None,
    else the records and their lengths, through the loaders the jobs use."""
    from k15_megatron.config.errors import ConfigError
    from k15_megatron.data.jsonl import read_prompts_numbered, read_sft_numbered
    from k15_megatron.data.prompt_set import PromptSet, prompt_token_limit
    from k15_megatron.data.sft_set import SftSet

    try:
        if read.records == PAIR_RECORDS:
            return _pair_problems(cfg, path, tokenizer)
        if tokenizer is None:
            (read_sft_numbered if read.records == SFT_RECORDS else read_prompts_numbered)(path, fields=cfg.data.fields)
            return [], ""
        if read.records == SFT_RECORDS:
            examples = SftSet.from_jsonl(path, tokenizer, seq_length=cfg.data.seq_length,
                                         too_long=cfg.data.too_long, processor=data_processor(cfg),
                                         fields=cfg.data.fields)
            return [], examples.filter_report(path)
        prompts = PromptSet.from_jsonl(path, tokenizer, max_prompt_tokens=prompt_token_limit(cfg.rollout),
                                       limit=cfg.eval.max_prompts if job == "eval" else 0,
                                       too_long=cfg.data.too_long, processor=data_processor(cfg),
                                       fields=cfg.data.fields)
        return [], prompts.filter_report(path)
    except ConfigError as exc:
        return exc.errors, ""
    except ValueError as exc:  # e.g. a tokenizer without an end-of-sequence token
        return [str(exc)], ""


_RECORD_FORMS = {SFT_RECORDS: "{prompt, response}", PROMPT_RECORDS: "{prompt, answer}",
                 PAIR_RECORDS: "{prompt, chosen, rejected} or {prompt, responses, correct}"}


def _pair_problems(cfg, path: str, tokenizer) -> Tuple[List[str], str]:
    """``k15 dpo``'s data check: the records only without a tokenizer, else the pairs the job
    builds (:func:`k15_megatron.jobs.dpo.read_pairs`); ConfigError propagates to the caller."""
    from k15_megatron.data.jsonl import _checked
    from k15_megatron.data.pairs import record_problems
    from k15_megatron.jobs.dpo import read_pairs

    if tokenizer is None:
        _checked(path, record_problems, fields=cfg.data.fields)
        return [], ""
    return [], read_pairs(cfg, tokenizer).report(path)
