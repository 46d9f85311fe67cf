"""reset_optimizer_state: after a reset the next step equals a fresh optimizer's, bit for bit; it
reports the bytes of state it discarded and is idempotent. leaf_optimizers walks Megatron's
ChainedOptimizer here; its walk through a real Megatron FP32Optimizer (which needs the device
seam) is exercised by tests/engine/test_engine_memory.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from k15_megatron.rl.optim_reset import leaf_optimizers, optimizer_has_state, reset_optimizer_state


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)),
            torch.nn.Parameter(torch.randn(7, generator=g))]


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _train(opt, params, steps, seed0=100):
    for s in range(steps):
        _set_grads(params, seed0 + s)
        opt.step()


def test_adam_reset_equals_fresh_optimizer():
    params = _params()
    opt = torch.optim.Adam(params, lr=0.1, betas=(0.8, 0.9), weight_decay=0.01)
    _train(opt, params, 3)
    assert all(int(opt.state[p]["step"]) == 3 for p in params)
    # exp_avg + exp_avg_sq (float32, like the parameter) + a float32 0-dim step per parameter
    expected = sum(2 * p.numel() * 4 + 4 for p in params)
    assert reset_optimizer_state(opt) == expected
    assert len(opt.state) == 0 and opt.param_groups[0]["lr"] == 0.1 and not optimizer_has_state(opt)
    assert reset_optimizer_state(opt) == 0  # idempotent: nothing left to discard

    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = torch.optim.Adam(twin, lr=0.1, betas=(0.8, 0.9), weight_decay=0.01)
    _train(opt, params, 2, seed0=7)
    _train(fresh, twin, 2, seed0=7)
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], fresh.state[q]["exp_avg_sq"])
        assert int(opt.state[p]["step"]) == 2


def test_without_reset_the_step_differs():
    # the control: the check above can fail - a stale state gives another update
    params = _params()
    opt = torch.optim.Adam(params, lr=0.1)
    _train(opt, params, 3)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = torch.optim.Adam(twin, lr=0.1)
    _train(opt, params, 1, seed0=7)
    _train(fresh, twin, 1, seed0=7)
    assert not torch.equal(params[0], twin[0])


def test_megatron_chained_optimizer_members_are_reset():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.optimizer import ChainedOptimizer
    a, b = _params(1), _params(2)
    opt_a, opt_b = torch.optim.Adam(a, lr=0.01), torch.optim.AdamW(b, lr=0.02)
    chained = ChainedOptimizer([opt_a, opt_b])
    _train(opt_a, a, 2)
    _train(opt_b, b, 2)
    assert list(leaf_optimizers(chained)) == [opt_a, opt_b]
    assert optimizer_has_state(chained)
    assert reset_optimizer_state(chained) == sum(2 * p.numel() * 4 + 4 for p in a + b)
    assert len(opt_a.state) == 0 and len(opt_b.state) == 0 and not optimizer_has_state(chained)


class _GroupStepSGD(torch.optim.Optimizer):
    """A real torch optimizer that keeps its step counter in the param group, as apex/TE
    FusedAdam do (those need CUDA): lr decays as lr / step."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            for p in group["params"]:
                p -= group["lr"] / group["step"] * p.grad


def test_group_level_step_counter_is_restarted():
    params = _params()
    opt = _GroupStepSGD(params, lr=0.5)
    _train(opt, params, 4)
    reset_optimizer_state(opt)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = _GroupStepSGD(twin, lr=0.5)
    _train(opt, params, 1, seed0=3)
    _train(fresh, twin, 1, seed0=3)
    assert torch.equal(params[0], twin[0]) and opt.param_groups[0]["step"] == 1


def test_unknown_object_is_a_value_error():
    assert reset_optimizer_state(None) == 0 and list(leaf_optimizers(None)) == []
    with pytest.raises(ValueError, match="object"):
        reset_optimizer_state(object())
