"""Per-iteration optimizer reset (PAPER.md section 1: the state is reset every iteration).

Each mirror-descent iteration is a fresh optimisation problem around a new reference pi_i, so
Adam's moments and step counter from the previous one are discarded (``rl.reset_optimizer``).
This module may not import Megatron; it walks wrappers by duck typing:

- ``chained_optimizers`` (Megatron's ChainedOptimizer): reset each member;
- ``optimizer`` (Megatron's FP32/Float16/Distributed optimizers wrap a torch optimizer there):
  reset the inner one;
- otherwise a torch.optim-like leaf: ``state`` is cleared in place (torch optimizers then
  re-initialise lazily at the next step, step counter included), and a ``step`` kept in a
  param group (apex/TE FusedAdam keep it there) is set back to 0.

Hyper-parameters (lr, betas, ...) and parameters are untouched. Megatron's distributed
optimizer re-creates its state through its own ``init_state_fn`` when it checkpoints, so an
empty state is valid there too.
"""

from __future__ import annotations


def reset_optimizer_state(optimizer) -> int:
    """Clear the moment buffers and step counters of ``optimizer`` (see module doc).

    Returns:
        The number of leaf optimizers reset (0 if the wrapper held no optimizer, e.g. a rank
        with frozen parameters only).

    Raises:
        ValueError: if ``optimizer`` is neither a known wrapper nor exposes ``state``.
    """
    if optimizer is None:
        return 0
    members = getattr(optimizer, "chained_optimizers", None)
    if members is not None:
        return sum(reset_optimizer_state(m) for m in members)
    # Megatron wrappers promote `state` as a property of the inner optimizer, so look inward
    # first; a plain torch optimizer has no `optimizer` attribute.
    if "optimizer" in getattr(optimizer, "__dict__", {}) or hasattr(type(optimizer), "optimizer"):
        return reset_optimizer_state(optimizer.optimizer)
    state = getattr(optimizer, "state", None)
    if state is None or not hasattr(state, "clear"):
        raise ValueError(f"cannot reset optimizer of type {type(optimizer).__name__}: it has no "
                         "'state' mapping, 'optimizer' or 'chained_optimizers' attribute")
    state.clear()
    for group in getattr(optimizer, "param_groups", []):
        if "step" in group:
            group["step"] = 0
    return 1
