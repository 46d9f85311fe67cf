"""The part every job shares: processes, model, weights, optimizer, tokenizer, from one config.

``build_trainer(cfg)`` starts torch.distributed and Megatron's parallel state, resolves the
architecture, builds this rank's model shard, loads the initial weights
(:mod:`k15_megatron.checkpoint.model_init`), wraps it for training and returns everything in a
:class:`Trainer`. Jobs (SFT, RL, eval) add their own loop on top.
"""

from __future__ import annotations

import dataclasses
import os

from k15_megatron.checkpoint.model_init import load_initial_weights
from k15_megatron.checkpoint.run_ckpt import resolve_checkpoint_dir
from k15_megatron.checkpoint import run_dir
from k15_megatron.config import resolve_model_arch
from k15_megatron.config.model_arch import resolve_vision_arch
from k15_megatron.data.formatting import use_chat_template
from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
from k15_megatron.models.tokenizer import load_tokenizer, tokenizer_folder
from k15_megatron.parallel.initialize import ParallelLayout, initialize
from k15_megatron.train.optimizer import build_training_objects


@dataclasses.dataclass
class Trainer:
    """What a job trains with (all for this rank)."""

    cfg: object
    layout: ParallelLayout
    arch: object
    padded_vocab: int
    tokenizer: object
    tokenizer_dir: str | None
    """Folder the tokenizer was loaded from (None: the built-in character tokenizer)."""
    model: object
    chunks: list
    optimizer: object
    scheduler: object
    init_source: str

    @property
    def is_logging_rank(self) -> bool:
        return self.layout.rank == 0

    def log(self, message: str) -> None:
        if self.is_logging_rank:
            print(message, flush=True)


def build_trainer(cfg, *, with_optimizer: bool = True, num_optimizer_steps: int | None = None) -> Trainer:
    """Set up processes and the model for ``cfg`` (collective; see the module docstring).

    ``num_optimizer_steps``: how many optimizer steps the job makes, the length of the
    learning-rate schedule when ``optim.lr_decay_iters`` is null (default
    ``optim.train_iters``, SFT's count; ``k15 rl`` passes rl.iterations x
    rl.updates_per_iteration)."""
    if cfg.deterministic:
        import torch

        torch.use_deterministic_algorithms(True)
    arch = resolve_model_arch(cfg.model)
    # The tokenizer is checked before any process group starts (a bad folder is a user error).
    init_checkpoint = resolve_checkpoint_dir(cfg.model.init_from) if cfg.model.init_from else None
    tokenizer_dir = tokenizer_folder(cfg.model, init_checkpoint=init_checkpoint)
    tokenizer = load_tokenizer(cfg.model, vocab_size=arch.vocab_size, init_checkpoint=init_checkpoint)
    use_chat_template(tokenizer, cfg.data.chat_template)  # its warning was printed before start-up
    layout = initialize(cfg.parallel, seed=cfg.seed)
    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, layout.tp_size)
    if layout.rank == 0 and run_dir.fresh_start(cfg):  # a resumed run's config.yaml is its checkpoint's
        run_dir.save_run_config(cfg)
    vision = resolve_vision_arch(cfg.model)
    if vision is not None:
        from k15_megatron.models.qwen2_vl import build_qwen2_vl_model

        model = build_qwen2_vl_model(arch, vision, parallel_cfg=cfg.parallel, precision_cfg=cfg.precision,
                                     padded_vocab=padded)
    else:
        model = build_gpt_model(arch, parallel_cfg=cfg.parallel, precision_cfg=cfg.precision, padded_vocab=padded)
    source = load_initial_weights(model, cfg.model, arch, padded, vision=vision)
    chunks, optimizer, scheduler = [model], None, None
    if with_optimizer:
        steps = cfg.optim.train_iters if num_optimizer_steps is None else num_optimizer_steps
        chunks, optimizer, scheduler = build_training_objects(model, optim_cfg=cfg.optim, precision_cfg=cfg.precision,
                                                              num_steps=steps)
    return Trainer(cfg=cfg, layout=layout, arch=arch, padded_vocab=padded, tokenizer=tokenizer,
                   tokenizer_dir=tokenizer_dir, model=model,
                   chunks=chunks, optimizer=optimizer, scheduler=scheduler, init_source=source)


def write_run_assets(trainer: Trainer) -> str:
    """``<run_dir>/hf_assets``: the run's tokenizer files and a config.json of its architecture,
    which every checkpoint and export of the run carries (rank 0 writes; returns the path)."""
    import json

    from k15_megatron.checkpoint.dist_ckpt import copy_hf_assets
    from k15_megatron.config.hf_config import hf_config_dict

    path = os.path.join(os.path.abspath(trainer.cfg.run_dir), "hf_assets")
    if trainer.is_logging_rank:
        os.makedirs(path, exist_ok=True)
        source = trainer.tokenizer_dir
        if source:
            copy_hf_assets(source, path)
        # The tokenizer as the run uses it: with the chat template data.chat_template chose, which
        # the next stage (model.init_from) and k15 export then keep.
        trainer.tokenizer.save_pretrained(path)
        base = None
        if source and os.path.exists(os.path.join(source, "config.json")):
            with open(os.path.join(source, "config.json")) as f:
                base = json.load(f)
        tok = trainer.tokenizer
        base = base or {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                        "pad_token_id": tok.pad_token_id}
        # A vision-language model's config.json (vision tower, token ids) is kept as it is.
        config = base if base and resolve_vision_arch(trainer.cfg.model) is not None else \
            hf_config_dict(trainer.arch, base)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def engine_model_folder(trainer: Trainer, assets: str) -> str:
    """A Hugging Face folder the rollout engine can start from (rank 0 writes, all return it):

    * ``model.hf_path`` itself when its config.json describes the architecture the trainer
      resolved (the usual case);
    * ``<run_dir>/hf_engine`` otherwise: with ``model.hf_path``, links to its files and a
      config.json of the resolved architecture, so that ``model.*`` overrides of the folder's
      config (``model.rope_scaling``, ``model.max_position_embeddings``, ...) reach vLLM as they
      reach Megatron; without it, random weights of the architecture and the run's tokenizer
      (the engine's weights are replaced by the first weight sync anyway).
    """
    import torch

    from k15_megatron.config import ModelConfig, resolve_model_arch

    hf_path = trainer.cfg.model.hf_path
    if hf_path and resolve_model_arch(ModelConfig(hf_path=hf_path)) == trainer.arch:
        return hf_path
    path = os.path.join(os.path.abspath(trainer.cfg.run_dir), "hf_engine")
    if trainer.is_logging_rank:
        if hf_path:
            _link_with_config(hf_path, path, trainer.arch)
        else:
            from k15_megatron.models.tiny import save_hf_model_from_arch

            save_hf_model_from_arch(trainer.arch, path, tokenizer=trainer.tokenizer, base_config_dir=assets)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def _link_with_config(source: str, path: str, arch) -> None:
    """``path``: a symbolic link to every file of ``source`` but config.json, which is written
    for ``arch`` over the source's own."""
    import json
    import shutil

    from k15_megatron.config.hf_config import hf_config_dict

    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    source = os.path.abspath(source)
    for name in os.listdir(source):
        if name != "config.json":
            os.symlink(os.path.join(source, name), os.path.join(path, name))
    with open(os.path.join(source, "config.json")) as f:
        base = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_dict(arch, base), f, indent=2)
