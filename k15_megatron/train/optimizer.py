"""Megatron DDP wrapping, the Megatron optimizer and its learning-rate schedule, from config.

``build_training_objects(model, optim_cfg, precision_cfg)`` returns the DDP-wrapped model chunks,
the ``MegatronOptimizer`` and the ``OptimizerParamScheduler``. Gradients are reduced over the
data-parallel group by Megatron's DDP; on CPU the same objects run over gloo (the distributed
optimizer is GPU-only and refused by config validation on CPU).
"""

from __future__ import annotations

import torch

from k15_megatron.models.gpt import torch_dtype, unwrap_model


def wrap_ddp(model, *, precision_cfg, use_distributed_optimizer: bool):
    """Wrap one model chunk in Megatron's DistributedDataParallel."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision_cfg.grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        # FP8 weights all-gathered as FP8 (Megatron-LM --fp8-param-gather sets both this and
        # TransformerConfig.fp8_param).
        fp8_param_gather=precision_cfg.fp8_param_gather,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks, *, optim_cfg, precision_cfg):
    """The Megatron optimizer over ``model_chunks`` (DDP-wrapped) configured by ``optim``."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = torch_dtype(precision_cfg.dtype)
    config = OptimizerConfig(
        optimizer=optim_cfg.optimizer,
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1,
        adam_beta2=optim_cfg.adam_beta2,
        adam_eps=optim_cfg.adam_eps,
        clip_grad=optim_cfg.clip_grad,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, list(model_chunks))


def build_scheduler(optimizer, *, optim_cfg, num_steps: int):
    """Megatron's OptimizerParamScheduler: linear warm-up then the configured decay over
    ``optim.lr_decay_iters`` steps, or over the job's ``num_steps`` optimizer steps when that
    is null (SFT: ``optim.train_iters``; RL: ``rl.iterations x rl.updates_per_iteration``)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_iters = optim_cfg.lr_decay_iters or num_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim_cfg.lr_warmup_iters else optim_cfg.lr,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        lr_warmup_steps=optim_cfg.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, optim_cfg.lr_warmup_iters + 1),
        lr_decay_style=optim_cfg.lr_decay_style,
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=max(decay_iters, 1),
        wd_incr_style="constant",
    )


def connect_schedule_hooks(model_chunks, optimizer) -> None:
    """Give the pipeline schedule the hooks Megatron's own training loop installs.

    ``finalize_model_grads`` runs after the last backward of a step: the data-parallel gradient
    reduction (DDP's ``finish_grad_sync``), the all-reduce of tied embedding gradients between
    the first and last pipeline stages, and sequence-parallel norm gradients. Without it DP
    replicas and the two copies of a tied embedding silently drift apart. ``grad_scale_func``
    applies the fp16 loss scale.
    """
    from megatron.core.distributed import finalize_model_grads

    config = unwrap_model(model_chunks[0]).config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss


def build_training_objects(model, *, optim_cfg, precision_cfg, num_steps: int):
    """(DDP model chunks, MegatronOptimizer, OptimizerParamScheduler) for one model chunk,
    with the schedule hooks connected (see :func:`connect_schedule_hooks`); the schedule
    spans ``num_steps`` optimizer steps (see :func:`build_scheduler`)."""
    chunks = [wrap_ddp(model, precision_cfg=precision_cfg,
                       use_distributed_optimizer=optim_cfg.use_distributed_optimizer)]
    optimizer = build_optimizer(chunks, optim_cfg=optim_cfg, precision_cfg=precision_cfg)
    connect_schedule_hooks(chunks, optimizer)
    return chunks, optimizer, build_scheduler(optimizer, optim_cfg=optim_cfg, num_steps=num_steps)
