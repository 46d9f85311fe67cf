"""A run directory's record of its starts, and which config changes a resumed run accepts.

Layout under ``run_dir`` (besides metrics and checkpoints)::

    config.yaml          the config the newest checkpoint was trained with; before the first
                         checkpoint, the config of the fresh start that will write it
    starts.jsonl         one JSON line per start of a training job: time (UTC), command line,
                         config file and overrides, the checkpoint it resumed from and its
                         iteration, the iteration the run is configured to reach
                         (target_iteration), the keys that changed against that checkpoint
                         (old, new)
    starts/NNNN.yaml     the resolved config of start NNNN
    checkpoints/iter_N/config.yaml   the config checkpoint N was written with (run_ckpt)

Before a training job (``k15 sft``, ``k15 rl``) starts any process, :func:`plan_start` compares
the new config with the one its resume checkpoint was trained with. Keys that only extend or
observe the run (:data:`RESUMABLE_KEYS`: the run length, logging, checkpoint cadence, evaluation)
may change; the difference is printed in one line and recorded. Any other change is refused,
naming each key (old -> new) and the way out: a new ``run_dir``, or
``checkpoint.allow_config_change=true``. The optimizer's settings and the learning-rate schedule
are restored from the checkpoint whatever the config says, so changes to them
(:data:`RESTORED_KEYS`) are refused even then (the way out is a new run with
``model.init_from``); a run length change is accepted
with a constant learning rate (after warm-up), or when ``optim.lr_decay_iters`` keeps the decay
the checkpoint was trained with. Accepted changes take effect (one the checkpoint cannot be
loaded into, such as another model shape, still fails at the load), and the checkpoints written
after the resume carry the new config. A run whose checkpoint already reached the configured
length is complete: nothing starts and nothing is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import sys
from typing import Any, Optional

from k15_megatron.config.errors import ConfigError
from k15_megatron.config.loader import RESOLVED_CONFIG_NAME, load_config, save_resolved_config, to_yaml
from k15_megatron.checkpoint import run_ckpt

STARTS_NAME = "starts.jsonl"
STARTS_DIR = "starts"
CHECKPOINT_CONFIG_NAME = "config.yaml"
RECORDED_ENV = "K15_START_RECORDED"
"""Set while a start's ranks run, so that ranks started by the recording process do not record it again."""

RUN_LENGTH_KEYS = {"sft": "optim.train_iters", "dpo": "optim.train_iters", "rl": "rl.iterations"}
"""The key that sets how many iterations a training job runs."""

RESTORED_KEYS = ("optim.optimizer", "optim.lr", "optim.min_lr", "optim.weight_decay", "optim.adam_beta1",
                 "optim.adam_beta2", "optim.adam_eps", "optim.lr_warmup_iters", "optim.lr_decay_style",
                 "optim.use_distributed_optimizer")
"""Keys a resume takes from the checkpoint rather than from the config (or cannot load under
another value): the optimizer's hyperparameters travel in its state (param groups), Megatron's
learning-rate scheduler loads the checkpoint's settings over the config's, and the optimizer's
kind and sharding shape that state. A change there could not apply, so it is refused even with
``checkpoint.allow_config_change``; the decay length has its own rule (:func:`plan_start`)."""

RESUMABLE_KEYS = ("rl.iterations", "optim.train_iters", "optim.lr_decay_iters", "logging.", "checkpoint.save_interval",
                  "checkpoint.keep_last", "checkpoint.allow_config_change", "checkpoint.save_dir",
                  "checkpoint.resume", "eval.", "rl.eval_interval", "rl.eval_max_prompts", "data.eval_path", "name",
                  "run_dir", "parallel.recompute", "parallel.cp_comm_type", "data.micro_batch_tokens")
"""Keys (a trailing dot: a whole section) that may change when a run resumes: they extend the
run, or only observe it (logs, checkpoint cadence, evaluations). ``checkpoint.save_dir`` is
where the checkpoint was just found, ``checkpoint.resume`` how it was found, and
``name``/``run_dir`` locate the run. Activation recompute, TE's CP communication type and the
micro-batch token budget change memory and speed, not what is trained. The run length and
``optim.lr_decay_iters`` also must keep the learning-rate schedule (see :func:`plan_start`)."""


@dataclasses.dataclass
class StartPlan:
    """What a start of a training job will do (see :func:`plan_start`)."""

    job: str
    resume_from: Optional[str]
    """The checkpoint the job will resume from (None: a fresh start)."""
    iteration: int
    """Its iteration (0 for a fresh start)."""
    final_iteration: int
    """The iteration the run ends at (``optim.train_iters`` or ``rl.iterations``)."""
    changes: list[tuple[str, Any, Any]]
    """(key, checkpoint's value, new value) of every key that differs from the checkpoint's config."""

    @property
    def complete(self) -> bool:
        return self.resume_from is not None and self.iteration >= self.final_iteration

    def complete_message(self) -> str:
        key = RUN_LENGTH_KEYS[self.job]
        return (f"k15 {self.job}: run already complete at iteration {self.iteration} ({self.resume_from}, "
                f"{key}={self.final_iteration}); nothing to do")

    def changes_message(self) -> str:
        return (f"k15 {self.job}: resuming {self.resume_from} with changed config: "
                f"{_changes_text(self.changes)}")


def flat_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a config dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_config(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def config_changes(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of every leaf that differs between two configs, in schema order."""
    before, after = flat_config(old), flat_config(new)
    return [(key, before.get(key), value) for key, value in after.items() if before.get(key) != value]


def checkpoint_config_path(checkpoint: str, run_dir: str) -> Optional[str]:
    """The config file describing ``checkpoint``: its own ``config.yaml``, else (checkpoints
    written before configs were saved with them) ``run_dir/config.yaml``; None if neither exists."""
    for path in (os.path.join(checkpoint, CHECKPOINT_CONFIG_NAME), os.path.join(run_dir, RESOLVED_CONFIG_NAME)):
        if os.path.isfile(path):
            return path
    return None


def _checkpoint_iteration(path: str) -> int:
    with open(os.path.join(path, run_ckpt.META)) as f:
        return int(json.load(f)["iteration"])


def _schedule_steps(cfg: Any, job: str) -> int:
    """Optimizer steps the learning-rate schedule decays over (as train/optimizer.build_scheduler)."""
    steps = cfg.optim.train_iters if job != "rl" else cfg.rl.iterations * cfg.rl.updates_per_iteration
    return max(cfg.optim.lr_decay_iters or steps, cfg.optim.lr_warmup_iters + 1)


def _changes_text(changes) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def plan_start(cfg: Any, *, job: str) -> StartPlan:
    """What starting training job ``job`` ("sft" or "rl") with ``cfg`` will do: resume from
    which checkpoint, and with which config changes. Reads files only (no process starts).

    Raises:
        ConfigError: the config differs from the resume checkpoint's in keys outside
            :data:`RESUMABLE_KEYS`, or the checkpoint's config no longer loads (neither with
            ``checkpoint.allow_config_change``); or in :data:`RESTORED_KEYS`, or in the
            decay length of a decaying learning-rate schedule (always: the checkpoint's
            settings would silently win).
        ValueError: ``checkpoint.save_dir`` holds a broken ``latest`` and no complete checkpoint.
    """
    final = flat_config(cfg)[RUN_LENGTH_KEYS[job]]
    if cfg.checkpoint.resume != "auto":
        _refuse_overwriting_checkpoints(cfg.checkpoint.save_dir)
        return StartPlan(job, None, 0, final, [])
    checkpoint = run_ckpt.find_resume_checkpoint(cfg.checkpoint.save_dir)
    if checkpoint is None:
        return StartPlan(job, None, 0, final, [])
    plan = StartPlan(job, checkpoint, _checkpoint_iteration(checkpoint), final, [])
    source = checkpoint_config_path(checkpoint, cfg.run_dir)
    if source is None:
        return plan
    try:
        old = load_config(source, check=False)
    except ValueError as exc:
        if cfg.checkpoint.allow_config_change:
            return plan
        raise ConfigError([f"{source} (the config of {checkpoint}) no longer loads: {exc}; start a new run "
                           "(another run_dir) or set checkpoint.allow_config_change=true to resume without "
                           "comparing configs"]) from None
    plan.changes = config_changes(old, cfg)
    restored = [c for c in plan.changes if c[0] in RESTORED_KEYS]
    old_steps, new_steps = _schedule_steps(old, job), _schedule_steps(cfg, job)
    hint = ""
    if old_steps != new_steps and not old.optim.lr_decay_style == cfg.optim.lr_decay_style == "constant":
        restored.append(("learning-rate decay length (optim.lr_decay_iters, else the job's optimizer steps)",
                         old_steps, new_steps))
        hint = (f"; optim.lr_decay_iters={old_steps} keeps the checkpoint's schedule while changing "
                f"{RUN_LENGTH_KEYS[job]}")
    if restored:
        raise ConfigError([f"{cfg.run_dir} resumes from {checkpoint}, which restores the optimizer's settings and "
                           f"the learning-rate schedule it was trained with, so these changes would not apply: "
                           f"{_changes_text(restored)}{hint}. To train these weights with other optimizer "
                           f"settings start a new run (another run_dir) with model.init_from="
                           f"{os.path.dirname(checkpoint)}"])
    refused = [c for c in plan.changes if not _resumable(c[0])]
    if refused and not cfg.checkpoint.allow_config_change:
        raise ConfigError([f"{cfg.run_dir} resumes from {checkpoint}, whose config ({source}) differs in keys "
                           f"that cannot change on resume: {_changes_text(refused)}. Start a new run "
                           "(another run_dir), or set checkpoint.allow_config_change=true to resume with the new "
                           f"values (the difference is recorded in {os.path.join(cfg.run_dir, STARTS_NAME)})"])
    return plan


def _refuse_overwriting_checkpoints(save_dir: str) -> None:
    """ConfigError when a fresh start (checkpoint.resume=never) would write its checkpoints over
    those already in ``save_dir``."""
    existing = sorted(name for name in (os.listdir(save_dir) if os.path.isdir(save_dir) else ())
                      if name == run_ckpt.LATEST or name.startswith("iter_"))
    if existing:
        raise ConfigError([f"checkpoint.resume=never starts a fresh run, but checkpoint.save_dir={save_dir} already "
                           f"holds checkpoints ({', '.join(existing[:4])}{', ...' if len(existing) > 4 else ''}) "
                           "that it would overwrite: choose another run_dir (or checkpoint.save_dir), or "
                           "checkpoint.resume=auto to continue them"])


def records_this_start() -> bool:
    """True in the one process that records a start: the process started by hand (it may go on
    to start the ranks), or rank 0 under an external launcher (torchrun, srun)."""
    from k15_megatron.parallel.launch import under_launcher

    if RECORDED_ENV in os.environ:
        return False
    if not under_launcher():
        return True
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def record_start(cfg: Any, plan: StartPlan, *, config_path: Optional[str], overrides) -> str:
    """Append this start to ``run_dir/starts.jsonl`` and save its config as
    ``run_dir/starts/NNNN.yaml``; returns the path of that copy. Call it in one process only
    (:func:`records_this_start`)."""
    folder = os.path.join(cfg.run_dir, STARTS_DIR)
    os.makedirs(folder, exist_ok=True)
    records = os.path.join(cfg.run_dir, STARTS_NAME)
    number = 1
    if os.path.exists(records):
        with open(records) as f:
            number += sum(1 for line in f if line.strip())
    copy = os.path.join(folder, f"{number:04d}.yaml")
    with open(copy, "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg))
    entry = {"start": number, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "job": plan.job, "command": shlex.join(sys.argv), "config_file": config_path,
             "overrides": list(overrides), "resumed_from": plan.resume_from,
             "resumed_iteration": plan.iteration if plan.resume_from else None,
             "target_iteration": plan.final_iteration,
             "changes": [{"key": k, "old": _json_value(old), "new": _json_value(new)} for k, old, new in plan.changes],
             "config": os.path.relpath(copy, cfg.run_dir)}
    with open(records, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    return copy


def _json_value(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def fresh_start(cfg: Any) -> bool:
    """True when this start resumes no checkpoint (``run_dir/config.yaml`` then describes it)."""
    return cfg.checkpoint.resume != "auto" or run_ckpt.find_resume_checkpoint(cfg.checkpoint.save_dir) is None


def save_run_config(cfg: Any) -> None:
    """``run_dir/config.yaml`` := ``cfg``: at a fresh start, and after each checkpoint written
    with ``cfg`` (one process only)."""
    save_resolved_config(cfg, cfg.run_dir)


def save_checkpoint(cfg: Any, iteration: int, *, is_logging_rank: bool, **state) -> str:
    """Write run checkpoint ``iteration`` of a training job into ``checkpoint.save_dir`` with
    ``cfg`` as its ``config.yaml`` (``state``: the other arguments of
    :func:`~k15_megatron.checkpoint.run_ckpt.save_run_checkpoint`), then, on the logging rank,
    ``run_dir/config.yaml`` := ``cfg``, so that it always describes the newest checkpoint.
    Collective; returns the checkpoint's directory."""
    path = run_ckpt.save_run_checkpoint(cfg.checkpoint.save_dir, iteration, keep_last=cfg.checkpoint.keep_last,
                                        config_yaml=to_yaml(cfg), **state)
    if is_logging_rank:
        save_run_config(cfg)
    return path
