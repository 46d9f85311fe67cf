"""Cross-field checks of an experiment configuration, run before any process group starts.

``validate`` collects every problem and raises one :class:`ConfigError` listing them; each
line names the key(s), their values and the fix. Two kinds of rules:

* per-field rules declared in the schema (``one_of`` choices, ``at_least`` minimums) and any
  section's own ``config_errors(prefix)`` hook: checked generically for every section, so
  sections added later need no change here;
* layout rules tying sections together, in Megatron-Core's terms (DP = world / (TP*PP*CP)):
  TP*PP*CP divides the world; EP divides DP*CP; heads and query groups divide by TP; layers
  divide by PP (or an explicit uneven split fits); the sequence divides by 2*CP and, with
  sequence parallelism, by TP*CP; the global batch divides by micro batch * DP; fp8 needs
  Transformer Engine, a GPU and TE version that have its recipe (:mod:`k15_megatron.config.fp8`)
  and GEMM sizes that are multiples of 16.

Choice documented here: ``sequence_parallel=true`` with ``tensor=1`` is an ERROR, not a
warning. Megatron silently switches it off, which leaves the saved config claiming a layout
that did not run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, List, Mapping, Optional

from k15_megatron.config.env import have_transformer_engine, resolve_world_size
from k15_megatron.config.errors import ConfigError
from k15_megatron.config.fp8 import Fp8Platform, fp8_errors, probe_fp8_platform
from k15_megatron.config.model_arch import ModelArch, context_source, resolve_model_arch, resolve_vision_arch
from k15_megatron.config.rollout import derive_max_model_len
from k15_megatron.config.fields import CHOICES, MINIMUM
from k15_megatron.config.schema import (DataConfig, ExperimentConfig,
                                        OptimConfig, ParallelConfig)

# Transformer Engine's FP8 GEMMs need both matrix dimensions to be multiples of 16.
_FP8_ALIGN = 16


def validate(
    cfg: ExperimentConfig,
    *,
    te_available: Optional[Callable[[], bool]] = None,
    environ: Optional[Mapping[str, str]] = None,
    fp8_platform: Optional[Callable[[], Optional[Fp8Platform]]] = None,
) -> None:
    """Raise ConfigError listing every problem in ``cfg``; return None when it is valid.

    Args:
        te_available: probe for Transformer Engine (default: ``find_spec`` on the real
            package). Tests inject a stand-in to reach the rules behind the fp8 check.
        environ: environment used when ``parallel.world_size`` is null (default os.environ).
        fp8_platform: probe of the TE version and GPU compute capability behind the fp8
            recipe rules (default :func:`k15_megatron.config.fp8.probe_fp8_platform`).

    Reads ``<model.hf_path>/config.json`` to learn head and layer counts and the model's
    context, which a null ``rollout.max_model_len`` and a null ``data.seq_length`` take, and
    half of which (at most 16384) a null ``rollout.max_response_tokens`` takes (filled in
    ``cfg``; an explicit max_model_len above the context is refused:
    :func:`~k15_megatron.config.rollout.derive_max_model_len`).
    """
    errors = section_field_errors(cfg)
    arch: Optional[ModelArch] = None
    if not any(e.startswith("model.") for e in errors):  # else already reported field by field
        try:
            arch = resolve_model_arch(cfg.model)
        except ValueError as e:
            errors.append(str(e))
    if arch is not None:
        errors += vision_job_errors(cfg.model, job=None)
        errors += derive_max_model_len(cfg.rollout, context=arch.max_position_embeddings,
                                       context_source=context_source(cfg.model))
        if cfg.data.seq_length is None:
            cfg.data.seq_length = arch.max_position_embeddings
    par = cfg.parallel
    sizes_ok = all(s >= 1 for s in (par.tensor, par.pipeline, par.context, par.expert))
    if sizes_ok:
        errors += _layout_errors(par, arch, cfg.data, cfg.model.make_vocab_size_divisible_by,
                                 environ)
        errors += _expert_errors(par, arch)
        errors += _cp_comm_errors(par, arch)
        if cfg.data.seq_length is not None:  # else the model is unresolved (reported above)
            errors += _sequence_errors(par, cfg.data.seq_length)
        errors += _precision_errors(cfg, arch, te_available or have_transformer_engine,
                                    fp8_platform or probe_fp8_platform)
    errors += _optim_errors(cfg.optim)
    if errors:
        raise ConfigError(errors)


def rl_job_errors(cfg: ExperimentConfig) -> List[str]:
    """Rules that only ``k15 rl`` needs, checked before its processes start.

    The RL job's learning-rate schedule runs over its real number of optimizer steps,
    ``rl.iterations x rl.updates_per_iteration`` (:func:`rl_optimizer_steps`), not over
    ``optim.train_iters`` (the SFT step count). Each iteration trains on a multiple of
    DP x ``rl.updates_per_iteration`` finished groups (:func:`rl_batch_errors`)."""
    steps = rl_optimizer_steps(cfg.rl)
    return schedule_errors(cfg.optim, num_steps=steps,
                           steps_key=f"rl.iterations x rl.updates_per_iteration = {steps}") + rl_batch_errors(cfg)


def rl_batch_errors(cfg: ExperimentConfig, environ: Optional[Mapping[str, str]] = None) -> List[str]:
    """``rl.prompts_per_iteration`` must be a multiple of DP x ``rl.updates_per_iteration``:
    an iteration trains the largest such multiple of its finished groups (every data-parallel
    rank and every optimizer step gets the same number), so any other value leaves groups
    waiting and some iterations training nothing. The message names both keys, the DP size and
    the nearest valid value. (Layout errors themselves are reported by :func:`validate`.)"""
    par, rl = cfg.parallel, cfg.rl
    mp = par.tensor * par.pipeline * par.context
    try:
        world, source = resolve_world_size(par.world_size, environ)
    except ValueError:
        return []
    if mp < 1 or world % mp or rl.updates_per_iteration < 1 or rl.prompts_per_iteration < 1:
        return []
    dp = world // mp
    unit = dp * rl.updates_per_iteration
    if rl.prompts_per_iteration % unit == 0:
        return []
    below = (rl.prompts_per_iteration // unit) * unit
    nearest = below if below and rl.prompts_per_iteration - below < below + unit - rl.prompts_per_iteration \
        else below + unit
    return [f"rl.prompts_per_iteration={rl.prompts_per_iteration} is not a multiple of rl.updates_per_iteration="
            f"{rl.updates_per_iteration} x data-parallel size {dp} = {unit} (world {world} ({source}) / "
            f"(parallel.tensor x parallel.pipeline x parallel.context = {mp})): each iteration trains a "
            f"multiple of {unit} finished groups, so the rest would wait and iterations would train nothing; "
            f"set rl.prompts_per_iteration={nearest}"]


def rl_optimizer_steps(rl_cfg: Any) -> int:
    """Optimizer steps of a full ``k15 rl`` run: one per mini-batch, ``updates_per_iteration``
    per iteration (an iteration with no finished group makes none, so this is an upper bound)."""
    return rl_cfg.iterations * rl_cfg.updates_per_iteration


def section_field_errors(obj: Any, prefix: str = "") -> List[str]:
    """Per-field rules of every (nested) section dataclass in ``obj``, plus each section's
    optional ``config_errors(prefix)`` hook."""
    errors: List[str] = []
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            errors += section_field_errors(value, f"{key}.")
            continue
        choices = f.metadata.get(CHOICES)
        if choices is not None and value is not None and value not in choices:
            errors.append(f"{key}={value!r} is not a valid choice; set {key} to one of "
                          f"{', '.join(choices)}")
        minimum = f.metadata.get(MINIMUM)
        if minimum is not None and value is not None and value < minimum:
            errors.append(f"{key}={value!r} must be >= {minimum}")
    hook = getattr(obj, "config_errors", None)
    if callable(hook):
        errors += list(hook(prefix.rstrip(".")))
    return errors


def _layout_errors(par: ParallelConfig, arch: Optional[ModelArch], data: DataConfig,
                   divisible_by: int, environ: Optional[Mapping[str, str]]) -> List[str]:
    errors: List[str] = []
    tp, pp, cp, ep = par.tensor, par.pipeline, par.context, par.expert
    if arch is not None:
        errors += _tensor_split_errors(arch, tp)
        errors += _vocab_padding_errors(arch.vocab_size, divisible_by, tp)
        errors += _pipeline_split_errors(par, arch.num_layers)
        errors += _mla_errors(par, arch)
    try:
        world, source = resolve_world_size(par.world_size, environ)
    except ValueError as e:
        return errors + [f"parallel.world_size is null and {e}"]
    mp = tp * pp * cp
    if world % mp:
        return errors + [
            f"parallel.tensor={tp} x parallel.pipeline={pp} x parallel.context={cp} = {mp} does "
            f"not divide the world size {world} ({source}); launch a multiple of {mp} processes "
            "or change the parallel sizes"]
    dp = world // mp
    if (dp * cp) % ep:
        errors.append(f"parallel.expert={ep} must divide data-parallel size x parallel.context = "
                      f"{dp} x {cp} = {dp * cp} (world {world}, {source}); choose a divisor of "
                      f"{dp * cp}, or run a multiple of {mp * ep // math.gcd(cp, ep)} processes (parallel.world_size)")
    per_step = data.micro_batch_size * dp
    if per_step >= 1 and data.global_batch_size % per_step:
        errors.append(
            f"data.global_batch_size={data.global_batch_size} is not divisible by "
            f"data.micro_batch_size={data.micro_batch_size} x data-parallel size {dp} = {per_step};"
            f" set data.global_batch_size to a multiple of {per_step}")
    return errors


def model_split_errors(arch: ModelArch, par: ParallelConfig, divisible_by: int) -> List[str]:
    """Whether ``arch`` splits over ``par.tensor`` x ``par.pipeline`` x ``par.expert`` ranks
    (heads and query groups by TP, the padded vocabulary by TP, layers by PP, experts by EP,
    which a dense model refuses): the rules a layout must meet
    before any rank builds the model (also used by the conversion tools)."""
    if par.tensor < 1 or par.pipeline < 1:
        return [f"parallel.tensor={par.tensor} and parallel.pipeline={par.pipeline} must be >= 1"]
    return (_tensor_split_errors(arch, par.tensor)
            + _vocab_padding_errors(arch.vocab_size, divisible_by, par.tensor)
            + _pipeline_split_errors(par, arch.num_layers)
            + _expert_errors(par, arch)
            + _mla_errors(par, arch))


def _mla_errors(par: ParallelConfig, arch: ModelArch) -> List[str]:
    """Multi-latent attention (DeepSeek-V3) runs with TP = 1 and CP = 1 here: the tensor-parallel
    layout of its latent projections is not mapped to Hugging Face names, and context
    parallelism has not been checked against a reference for it."""
    if not arch.is_mla:
        return []
    return [f"parallel.{key}={value}: model family {arch.family!r} (multi-latent attention) supports "
            f"parallel.{key}=1 only; split it with parallel.expert and parallel.pipeline"
            for key, value in (("tensor", par.tensor), ("context", par.context)) if value > 1]


def _tensor_split_errors(arch: ModelArch, tp: int) -> List[str]:
    errors = []
    for key, value in (("model.num_attention_heads", arch.num_attention_heads),
                       ("model.num_query_groups", arch.num_query_groups)):
        if value % tp:
            errors.append(f"{key}={value} is not divisible by parallel.tensor={tp}; choose "
                          f"parallel.tensor among "
                          f"{_divisors(math.gcd(arch.num_attention_heads, arch.num_query_groups))}")
    return errors


def _vocab_padding_errors(vocab: int, divisible_by: int, tp: int) -> List[str]:
    """The embedding is padded to a multiple of ``divisible_by`` alone (so one checkpoint loads
    under every TP dividing it; see models.gpt.padded_vocab_size); TP must divide that."""
    if divisible_by < 1:
        return []  # reported by the field minimum
    padded = -(-vocab // divisible_by) * divisible_by
    if padded % tp:
        return [f"padded vocabulary {padded} (model.vocab_size={vocab} rounded up to "
                f"model.make_vocab_size_divisible_by={divisible_by}) is not divisible by "
                f"parallel.tensor={tp}; set model.make_vocab_size_divisible_by to a multiple of "
                f"{tp}"]
    return []


def _pipeline_split_errors(par: ParallelConfig, num_layers: int) -> List[str]:
    """Even split, or Megatron's uneven split: the given first/last stage sizes are taken out
    and the remaining layers are shared evenly by the middle stages (at least one each)."""
    pp, first, last = par.pipeline, par.pipeline_first_stage_layers, par.pipeline_last_stage_layers
    if first is None and last is None:
        if num_layers % pp:
            return [f"model.num_layers={num_layers} is not divisible by parallel.pipeline={pp}; "
                    f"choose parallel.pipeline among {_divisors(num_layers)} or give an uneven "
                    "split with parallel.pipeline_first_stage_layers / "
                    "parallel.pipeline_last_stage_layers"]
        return []
    given = f"pipeline_first_stage_layers={first}, pipeline_last_stage_layers={last}"
    if pp < 2:
        return [f"parallel.{given} need parallel.pipeline >= 2 (got {pp}); set them to null"]
    middle_layers = num_layers - (first or 0) - (last or 0)
    middle_stages = pp - (first is not None) - (last is not None)
    if middle_layers < 0 or bool(middle_layers) != bool(middle_stages) or (
            middle_stages and middle_layers % middle_stages):
        return [f"parallel.{given} with parallel.pipeline={pp} leave {middle_layers} of "
                f"model.num_layers={num_layers} for {middle_stages} middle stage(s); the "
                "remainder must split evenly with at least one layer per middle stage (and be 0 "
                "when there are no middle stages)"]
    return []


def _cp_comm_errors(par: ParallelConfig, arch: Optional[ModelArch]) -> List[str]:
    """Transformer Engine's all-to-all CP attention scatters each TP rank's heads over the CP
    ranks, so they must divide."""
    if par.context == 1 or par.cp_comm_type != "a2a" or arch is None or arch.num_attention_heads % par.tensor:
        return []
    heads = arch.num_attention_heads // par.tensor
    if heads % par.context:
        return [f"parallel.cp_comm_type=a2a scatters the {heads} attention heads of each tensor-parallel rank "
                f"(model.num_attention_heads={arch.num_attention_heads} / parallel.tensor={par.tensor}) over "
                f"parallel.context={par.context} ranks, which must divide them; use parallel.cp_comm_type=p2p or "
                "a context size that divides the heads"]
    return []


def vision_job_errors(model_cfg, *, job: Optional[str]) -> List[str]:
    """A vision-language model (model_type qwen2_vl or qwen2_5_vl) is run by the jobs whose
    :data:`k15_megatron.jobs.preflight.JOBS` entry says ``images`` (``k15 sft``, ``k15 rl``,
    ``k15 eval``); for any other ``job`` it is refused here, before any process starts (called by
    the jobs' pre-start check for the jobs that do not run images). ``job=None``: only the
    vision config's own errors (config validation, shared by every job)."""
    try:
        vision = resolve_vision_arch(model_cfg)
    except ValueError as e:
        return [str(e)]
    if vision is None or job is None:
        return []
    return [f"model.family={vision.family!r} (model_type in {model_cfg.hf_path}/config.json): k15 {job} does not "
            f"run vision-language models (k15 sft, k15 rl, k15 eval, k15 export and the converters do); use a text "
            f"model for k15 {job}"]


def _expert_errors(par: ParallelConfig, arch: Optional[ModelArch]) -> List[str]:
    """Expert parallelism needs a mixture-of-experts model whose experts divide over the EP
    ranks; Megatron's "allgather" dispatcher refuses micro-batches of different lengths, which
    pipeline parallelism runs (packed sequences)."""
    errors = []
    if par.moe_token_dispatcher_type == "allgather" and par.pipeline > 1:
        errors.append(f"parallel.moe_token_dispatcher_type=allgather does not run micro-batches of different "
                      f"lengths, which parallel.pipeline={par.pipeline} needs; use alltoall")
    if arch is None or par.expert == 1:
        return errors
    if not arch.is_moe:
        errors.append(f"parallel.expert={par.expert}: model family {arch.family!r} has no experts; "
                      "set parallel.expert=1")
    elif arch.num_moe_experts % par.expert:
        errors.append(f"parallel.expert={par.expert} must divide the {arch.num_moe_experts} experts of each "
                      f"MoE layer (model.num_moe_experts); choose one of {_divisors(arch.num_moe_experts)}")
    return errors


def _sequence_errors(par: ParallelConfig, seq: int) -> List[str]:
    """Sequence parallelism needs TP > 1. (Sequences need no particular length under CP or SP:
    every packed sequence is padded to the multiple they need,
    :func:`k15_megatron.parallel.context.sequence_multiple`.)"""
    if par.sequence_parallel and par.tensor == 1:
        return ["parallel.sequence_parallel=true needs parallel.tensor > 1 (got 1); set "
                "parallel.sequence_parallel=false"]
    return []


def _precision_errors(cfg: ExperimentConfig, arch: Optional[ModelArch],
                      te_available: Callable[[], bool], fp8_platform) -> List[str]:
    prec, tp = cfg.precision, cfg.parallel.tensor
    if prec.fp8 is None:
        return []
    te_installed = te_available()
    errors = fp8_errors(prec, te_installed=te_installed, platform=fp8_platform() if te_installed else None,
                        use_distributed_optimizer=cfg.optim.use_distributed_optimizer)
    if not te_installed or arch is None:
        return errors
    dims = {
        "model.hidden_size": arch.hidden_size,
        "model.ffn_hidden_size / parallel.tensor": arch.ffn_hidden_size / tp,
        "model.num_attention_heads x model.kv_channels / parallel.tensor":
            arch.num_attention_heads * arch.kv_channels / tp,
    }
    return errors + [f"precision.fp8={prec.fp8!r}: {name} = {value:g} is not a multiple of {_FP8_ALIGN} "
                     "(Transformer Engine FP8 GEMM requirement); set precision.fp8=null"
                     for name, value in dims.items() if value % _FP8_ALIGN]


def _optim_errors(opt: OptimConfig) -> List[str]:
    errors = []
    if opt.min_lr > opt.lr:
        errors.append(f"optim.min_lr={opt.min_lr} exceeds optim.lr={opt.lr}; lower optim.min_lr")
    for key, beta in (("optim.adam_beta1", opt.adam_beta1), ("optim.adam_beta2", opt.adam_beta2)):
        if beta >= 1.0:
            errors.append(f"{key}={beta} must be < 1")
    return errors + schedule_errors(opt, num_steps=opt.train_iters,
                                    steps_key=f"optim.train_iters={opt.train_iters}")


def schedule_errors(opt: OptimConfig, *, num_steps: int, steps_key: str) -> List[str]:
    """The warm-up must end before the decay does. The decay length is
    ``optim.lr_decay_iters``, else the job's optimizer step count ``num_steps`` (named by
    ``steps_key``: ``optim.train_iters`` for SFT, rl.iterations x rl.updates_per_iteration
    for RL)."""
    if opt.lr_decay_style == "constant":
        return []
    decay = opt.lr_decay_iters if opt.lr_decay_iters is not None else num_steps
    if opt.lr_warmup_iters >= decay:
        return [f"optim.lr_warmup_iters={opt.lr_warmup_iters} must be smaller than the decay "
                f"length {decay} (optim.lr_decay_iters, or {steps_key} when null) with "
                f"optim.lr_decay_style={opt.lr_decay_style!r}"]
    return []


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
