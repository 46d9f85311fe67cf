"""Training-run checkpoints: everything needed to continue a run exactly, written atomically.

Layout under ``checkpoint.save_dir``::

    iter_0000012/
        dist/              model + optimizer (Megatron dist_checkpointing, any TP/PP on load)
        rank_00000.pt ...  per-rank state: every RNG (Python, NumPy, torch, CUDA, Megatron's
                           model-parallel streams) and anything else the caller puts there
        run_state.pt       rank 0: the caller's run state (iteration counters, LR scheduler,
                           sampler and success rates, replay buffer with unfinished segments)
        config.yaml        the resolved config the run was trained with (when given)
        k15_meta.json      written last: a directory without it is incomplete
    latest                 the name of the newest complete checkpoint (one line)

Atomicity: ranks write into ``iter_N.tmp``; after a barrier rank 0 writes the metadata,
renames the directory to ``iter_N`` and only then replaces ``latest`` (write to a temporary
file, then rename). A crash at any point leaves ``latest`` naming a complete checkpoint.
Leftovers of a save that was killed (``iter_N.tmp``, ``latest.tmp``) are never read, and rank 0
removes them after the next successful save. The model and optimizer are written with the stop
signals blocked (:func:`~k15_megatron.checkpoint.dist_ckpt.stop_signals_blocked`), so helper
processes of the writer survive a SIGTERM/SIGUSR1 sent to the whole job.
:func:`find_resume_checkpoint` trusts ``latest`` only if it names a complete checkpoint;
otherwise (garbled, missing, incomplete) it warns and falls back to the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from typing import Optional

import numpy as np
import torch

from k15_megatron.checkpoint.dist_ckpt import copy_hf_assets, stop_signals_blocked
from k15_megatron.models.gpt import unwrap_model
from k15_megatron.parallel.device import collective_device
from k15_megatron.parallel.initialize import barrier, global_rank
from k15_megatron.rl.optim_reset import optimizer_has_state

LATEST = "latest"
META = "k15_meta.json"
FORMAT = "k15-megatron-run"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"








def rng_state() -> dict:
    """Every random-number state of this process (Megatron's model-parallel streams included)."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a state captured by :func:`rng_state`."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def _sharded_state(model_chunks, optimizer, *, is_loading: bool, with_optimizer: bool):
    model_sd = unwrap_model(model_chunks[0]).sharded_state_dict()
    if not with_optimizer:
        return {"model": model_sd}
    # is_loading makes a fresh optimizer create its (empty) state first, so the checkpoint's
    # moments and step counters have somewhere to go.
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}


def _all_ranks_agree(flag: bool) -> bool:
    """True only if ``flag`` is True on every rank (all ranks must save the same structure)."""
    if not torch.distributed.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0], device=collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_run_checkpoint(save_dir: str, iteration: int, *, model_chunks, optimizer, run_state: dict,
                        rank_state: dict, hf_assets_dir: Optional[str] = None, keep_last: int = 3,
                        config_yaml: Optional[str] = None) -> str:
    """Write checkpoint ``iteration`` (collective over all ranks); returns its directory.
    ``config_yaml``: the run's resolved config, saved as ``config.yaml`` in the checkpoint."""
    from megatron.core import dist_checkpointing

    save_dir = os.path.abspath(save_dir)
    final = os.path.join(save_dir, iteration_dir_name(iteration))
    tmp = final + ".tmp"
    if global_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "dist"))
    barrier()
    # An optimizer without state (e.g. reset at the start of an RL iteration that had nothing to
    # train on) is saved as such: there are no moments to write.
    with_optimizer = _all_ranks_agree(optimizer_has_state(optimizer))
    with stop_signals_blocked():
        dist_checkpointing.save(_sharded_state(model_chunks, optimizer, is_loading=False, with_optimizer=with_optimizer),
                                os.path.join(tmp, "dist"))
    torch.save({**rank_state, "rng": rng_state()}, os.path.join(tmp, f"rank_{global_rank():05d}.pt"))
    barrier()
    if global_rank() == 0:
        torch.save(run_state, os.path.join(tmp, "run_state.pt"))
        copy_hf_assets(hf_assets_dir, os.path.join(tmp, "hf_assets"))
        if config_yaml is not None:
            with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(config_yaml)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"format": FORMAT, "iteration": iteration, "world_size": world,
                       "optimizer_state": with_optimizer}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(save_dir, LATEST), iteration_dir_name(iteration) + "\n")
        _prune(save_dir, keep_last)
    barrier()
    return final


def _prune(save_dir: str, keep_last: int) -> None:
    """Remove leftovers of killed saves, then all but the newest ``keep_last`` checkpoints."""
    for name in os.listdir(save_dir):
        if name == LATEST + ".tmp" or (name.endswith(".tmp") and _ITER_DIR.match(name[:-len(".tmp")])):
            path = os.path.join(save_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
    if keep_last <= 0:
        return
    complete = sorted(i for i, _ in _complete_checkpoints(save_dir))
    for iteration in complete[:-keep_last]:
        shutil.rmtree(os.path.join(save_dir, iteration_dir_name(iteration)), ignore_errors=True)


def is_complete(path: str) -> bool:
    """True if ``path`` is a finished run checkpoint (metadata readable and consistent)."""
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("format") == FORMAT and os.path.isfile(os.path.join(path, "run_state.pt"))


def _complete_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        match = _ITER_DIR.match(name)
        if match and is_complete(os.path.join(save_dir, name)):
            found.append((int(match.group(1)), os.path.join(save_dir, name)))
    return sorted(found)


def find_resume_checkpoint(save_dir: str) -> Optional[str]:
    """The checkpoint to resume from: what ``latest`` names if complete, else the newest
    complete one (with a warning saying why), else None when there is nothing to resume."""
    pointer = os.path.join(save_dir, LATEST)
    complete = _complete_checkpoints(save_dir)
    if os.path.exists(pointer):
        try:
            with open(pointer) as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            name, reason = None, f"unreadable ({exc})"
        else:
            reason = f"names {name!r}, which is not a complete checkpoint"
            if _ITER_DIR.match(name or "") and is_complete(os.path.join(save_dir, name)):
                return os.path.join(save_dir, name)
        if not complete:
            raise ValueError(f"{pointer} {reason}, and {save_dir} holds no complete checkpoint to "
                             "fall back to; remove the directory or start the run in another run_dir")
        warnings.warn(f"{pointer} {reason}; resuming from the newest complete checkpoint "
                      f"{complete[-1][1]} instead")
        return complete[-1][1]
    return complete[-1][1] if complete else None


def load_run_checkpoint(path: str, *, model_chunks, optimizer) -> tuple[dict, dict]:
    """Load model, optimizer and this rank's RNG state from ``path``; returns
    ``(run_state, rank_state)`` for the caller to restore the rest (collective)."""
    from megatron.core import dist_checkpointing

    if not is_complete(path):
        raise ValueError(f"{path}: not a complete run checkpoint (no valid {META})")
    rank_file = os.path.join(path, f"rank_{global_rank():05d}.pt")
    if not os.path.exists(rank_file):
        raise ValueError(f"{path}: no state for rank {global_rank()} ({rank_file}); a run checkpoint "
                         "resumes with the world size it was saved with")
    with open(os.path.join(path, META)) as f:
        with_optimizer = json.load(f).get("optimizer_state", True)
    sharded = _sharded_state(model_chunks, optimizer, is_loading=True, with_optimizer=with_optimizer)
    state = dist_checkpointing.load(sharded, os.path.join(path, "dist"))
    unwrap_model(model_chunks[0]).load_state_dict(state["model"], strict=True)
    if with_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    run_state = torch.load(os.path.join(path, "run_state.pt"), weights_only=False)
    return run_state, rank_state


def resolve_checkpoint_dir(path: str) -> str:
    """``path`` itself, or for a run's save directory (holding ``latest``) the checkpoint it names."""
    if os.path.exists(os.path.join(path, LATEST)):
        found = find_resume_checkpoint(path)
        if found is None:
            raise ValueError(f"{path}: no complete checkpoint")
        return found
    return path


def load_model_weights(path: str, model) -> None:
    """Load only the model weights of run checkpoint ``path`` (optimizer etc. ignored)."""
    from megatron.core import dist_checkpointing

    if not is_complete(path):
        raise ValueError(f"{path}: not a complete run checkpoint (no valid {META})")
    module = unwrap_model(model)
    state = dist_checkpointing.load({"model": module.sharded_state_dict()}, os.path.join(path, "dist"))
    module.load_state_dict(state["model"], strict=True)
