"""Per-iteration optimizer reset (PAPER.md section 1) and the one walk over optimizer wrappers.

Each mirror-descent iteration is a fresh optimisation problem around a new reference pi_i, so
Adam's moments and step counter from the previous one are discarded (``rl.reset_optimizer``).

This module may not import Megatron, so :func:`leaf_optimizers` walks Megatron's wrappers by
duck typing; it is the only such walk in the package (the hybrid engine's memory steps and the
run checkpoint use it too):

- ``chained_optimizers`` (Megatron's ChainedOptimizer): each member in turn;
- ``optimizer`` (Megatron's FP32/Float16/Distributed optimizers wrap a torch optimizer there):
  the inner one;
- otherwise a torch.optim-like leaf with a ``state`` mapping.

A reset clears each leaf's ``state`` in place (torch optimizers then re-initialise lazily at the
next step, step counter included) and sets a ``step`` kept in a param group (apex/TE FusedAdam
keep it there) back to 0. Hyper-parameters (lr, betas, ...) and parameters are untouched.
Megatron's distributed optimizer re-creates its state through its own ``init_state_fn`` when it
checkpoints, so an empty state is valid there too.
"""

from __future__ import annotations

from typing import Iterator

import torch


def leaf_optimizers(optimizer) -> Iterator:
    """The torch.optim-like optimizers inside ``optimizer`` (see module doc), in chain order.

    ``None`` yields nothing (a rank with frozen parameters only).

    Raises:
        ValueError: for a leaf without a ``state`` mapping.
    """
    if optimizer is None:
        return
    members = getattr(optimizer, "chained_optimizers", None)
    if members is not None:
        for member in members:
            yield from leaf_optimizers(member)
        return
    # Megatron wrappers promote `state` as a property of the inner optimizer, so look inward
    # first; a plain torch optimizer has no `optimizer` attribute.
    if "optimizer" in getattr(optimizer, "__dict__", {}) or hasattr(type(optimizer), "optimizer"):
        yield from leaf_optimizers(optimizer.optimizer)
        return
    state = getattr(optimizer, "state", None)
    if state is None or not hasattr(state, "clear"):
        raise ValueError(f"cannot walk optimizer of type {type(optimizer).__name__}: it has no "
                         "'state' mapping, 'optimizer' or 'chained_optimizers' attribute")
    yield optimizer


def state_tensors(optimizer) -> Iterator[tuple[dict, str, torch.Tensor]]:
    """Every tensor of every leaf's per-parameter state as ``(state_dict, key, tensor)``."""
    for leaf in leaf_optimizers(optimizer):
        for state in leaf.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    yield state, key, value


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the state tensors of ``optimizer`` (sum of numel * element_size)."""
    return sum(t.numel() * t.element_size() for _, _, t in state_tensors(optimizer))


def reset_optimizer_state(optimizer) -> int:
    """Clear the moment buffers and step counters of ``optimizer`` (see module doc). Idempotent.

    Returns:
        The bytes of state tensors discarded (sum of numel * element_size; 0 when the state
        was already empty, e.g. reset twice in a row).

    Raises:
        ValueError: if ``optimizer`` is neither a known wrapper nor exposes ``state``.
    """
    discarded = 0
    for leaf in leaf_optimizers(optimizer):
        discarded += optimizer_state_bytes(leaf)
        leaf.state.clear()
        for group in getattr(leaf, "param_groups", []):
            if "step" in group:
                group["step"] = 0
    return discarded


def optimizer_has_state(optimizer) -> bool:
    """True if any leaf optimizer holds per-parameter state (False right after a reset)."""
    return any(bool(leaf.state) for leaf in leaf_optimizers(optimizer))
