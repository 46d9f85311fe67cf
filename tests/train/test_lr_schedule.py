"""The learning-rate schedule spans the job's optimizer steps: Megatron's scheduler built by
``build_scheduler`` reaches min_lr exactly after ``num_steps`` steps when lr_decay_iters is null
(``k15 rl`` passes rl.iterations x rl.updates_per_iteration, ``k15 sft`` optim.train_iters)."""

import math

import pytest
import torch

from k15_megatron.config import OptimConfig
from k15_megatron.train.optimizer import build_scheduler


def _lrs(optim_cfg, num_steps, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim_cfg.lr)
    sched = build_scheduler(opt, optim_cfg=optim_cfg, num_steps=num_steps)
    out = []
    for _ in range(steps):
        sched.step(1)
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_decay_spans_num_steps_not_train_iters(style):
    cfg = OptimConfig(lr=1.0, min_lr=0.1, lr_decay_style=style, lr_warmup_iters=2, train_iters=1000)
    lrs = _lrs(cfg, num_steps=12, steps=14)
    assert lrs[1] == pytest.approx(1.0)                    # warm-up ends at step 2
    assert lrs[11] == pytest.approx(0.1) and lrs[13] == pytest.approx(0.1)  # min_lr from step 12 on
    progress = (6 - 2) / (12 - 2)                          # step 6 of the decay
    expected = {"linear": 1.0 - 0.9 * progress,
                "cosine": 0.1 + 0.9 * 0.5 * (math.cos(math.pi * progress) + 1.0)}[style]
    assert lrs[5] == pytest.approx(expected)


def test_explicit_decay_length_wins():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, lr_decay_style="linear", lr_decay_iters=40)
    assert _lrs(cfg, num_steps=10, steps=20)[19] == pytest.approx(0.5)
