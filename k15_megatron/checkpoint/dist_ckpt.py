"""Megatron-Core distributed checkpoints of a model, written atomically, with k15 metadata.

A k15 checkpoint directory holds:

* the ``megatron.core.dist_checkpointing`` files (layout-independent: a checkpoint saved under
  one TP/PP layout loads under another, resharded on load);
* ``k15_meta.json``: ``{"format": "k15-megatron", "version": 1, "arch": {...ModelArch...},
  "padded_vocab": int, "saved_layout": {"tensor": int, "pipeline": int}}``;
* ``hf_assets/``: the tokenizer files and the original ``config.json`` of the Hugging Face model
  it came from (if any), so exporting back to Hugging Face is self-contained.

Atomicity: every rank writes into a staging folder (:mod:`k15_megatron.checkpoint.output_dir`);
after a barrier rank 0 writes the metadata and publishes it, so a crash never leaves a
half-written directory under the final name. An existing non-empty directory is refused unless
``overwrite``; then only the checkpoint's own files are replaced (a user's other files stay).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal

from k15_megatron.checkpoint import output_dir
from k15_megatron.models.gpt import unwrap_model
from k15_megatron.parallel.initialize import barrier, global_rank
from k15_megatron.parallel.launch import STOP_SIGNALS

META_FILE = "k15_meta.json"
ASSETS_DIR = "hf_assets"
FORMAT = "k15-megatron"
VERSION = 1
_ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
                "merges.txt",
                # a vision-language model's image/video processors (resizing, token expansion)
                "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")








@contextlib.contextmanager
def stop_signals_blocked():
    """Block SIGTERM/SIGINT/SIGUSR1 in this thread for the duration, so that every process started
    inside inherits them blocked (a blocked mask survives fork and exec; handlers do not).

    Signals that arrive meanwhile stay pending, or are taken by another thread; none is lost.
    multiprocessing's resource tracker is started first: starting it unblocks SIGINT and SIGTERM
    in the calling thread, so the mask is set again after it."""
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def copy_hf_assets(hf_dir: str | None, dest: str) -> None:
    """Copy tokenizer and config files (not weights) from ``hf_dir`` into ``dest``."""
    os.makedirs(dest, exist_ok=True)
    if not hf_dir:
        return
    for name in _ASSET_FILES:
        src = os.path.join(hf_dir, name)
        if os.path.exists(src):
            shutil.copy2(src, os.path.join(dest, name))


def save_model(model, ckpt_dir: str, *, arch, padded_vocab: int, hf_assets_from: str | None = None,
               overwrite: bool = False) -> list[str]:
    """Save this rank's part of ``model`` into the distributed checkpoint ``ckpt_dir`` (collective).
    Returns the names written on rank 0 (``[]`` elsewhere). ValueError when ``ckpt_dir`` is a
    non-empty folder and ``overwrite`` is false."""
    from megatron.core import dist_checkpointing, parallel_state as ps

    ckpt_dir = os.path.abspath(ckpt_dir)
    output_dir.check_output_dir(ckpt_dir, overwrite=overwrite, inputs=[hf_assets_from] if hf_assets_from else [])
    tmp = output_dir.staging_path(ckpt_dir)
    if global_rank() == 0:
        output_dir.make_staging_dir(ckpt_dir)
    barrier()
    with stop_signals_blocked():
        dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), tmp)
    barrier()
    if global_rank() == 0:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "arch": dataclasses.asdict(arch),
            "padded_vocab": padded_vocab,
            "saved_layout": {"tensor": ps.get_tensor_model_parallel_world_size(),
                             "pipeline": ps.get_pipeline_model_parallel_world_size()},
        }
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        copy_hf_assets(hf_assets_from, os.path.join(tmp, ASSETS_DIR))
        written = output_dir.publish(tmp, ckpt_dir, marker=META_FILE, owned=output_dir.DIST_CKPT_OWNED)
    barrier()
    return written if global_rank() == 0 else []


def read_meta(ckpt_dir: str) -> dict:
    """The k15 metadata of ``ckpt_dir``; ValueError naming the directory if it is not a k15 checkpoint."""
    path = os.path.join(ckpt_dir, META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{ckpt_dir}: not a k15 checkpoint (no {META_FILE}); "
                         f"convert Hugging Face folders with tools/convert_hf_to_megatron.py") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt metadata ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r} v{meta.get('version')}")
    return meta


def arch_from_meta(meta: dict):
    """The ModelArch recorded in a checkpoint's metadata."""
    from k15_megatron.config.model_arch import ModelArch

    return ModelArch(**meta["arch"])


def load_model(model, ckpt_dir: str) -> None:
    """Load ``ckpt_dir`` into this rank's part of ``model`` (any TP/PP layout; collective).

    Raises ValueError naming the checkpoint when its parameters do not fit the model.
    """
    from megatron.core import dist_checkpointing

    read_meta(ckpt_dir)
    module = unwrap_model(model)
    try:
        state = dist_checkpointing.load(module.sharded_state_dict(), ckpt_dir)
    except Exception as exc:  # Megatron raises assorted errors for shape/key mismatches
        raise ValueError(f"{ckpt_dir}: checkpoint does not fit the model built from its config ({exc})") from exc
    module.load_state_dict(state, strict=True)
