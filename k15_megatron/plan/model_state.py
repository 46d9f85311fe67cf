"""Bytes one rank holds for the model's state: weights, gradient buffers, optimizer states.

As Megatron-Core allocates them (megatron/core/distributed, megatron/core/optimizer):

* weights: ``precision.dtype`` per parameter;
* gradients: DDP's contiguous ``main_grad`` buffer over all of the rank's parameters, float32
  with ``precision.grad_reduce_in_fp32`` (or an fp32 model), else the model dtype. The
  distributed optimizer does not shard it (gradients are reduce-scattered inside it);
* optimizer: Adam's two float32 moments (SGD: one momentum buffer) plus, for a bf16/fp16
  model, a float32 master copy of every parameter. The distributed optimizer shards all of it
  over the data-parallel group *with* context parallelism (DP x CP ranks hold the same
  parameters), otherwise every rank holds it whole. A mixture-of-experts model's routed
  experts are sharded over their own data-parallel group, DP x CP / EP ranks (Megatron's
  expert data-parallel group with the expert tensor-parallel size equal to TP).
"""

from __future__ import annotations

from dataclasses import dataclass

from k15_megatron.plan.layout import Layout

FP32 = 4


@dataclass(frozen=True)
class ModelState:
    """Bytes of one rank's model state."""

    weights: int
    gradients: int
    master: int
    """float32 master copies of a bf16/fp16 model's parameters (0 for fp32): optimizer
    parameters, which the hybrid engine's memory steps keep resident."""
    moments: int
    """Adam's moments / SGD's momentum: dropped or offloaded during rollouts."""

    @property
    def optimizer(self) -> int:
        return self.master + self.moments


def _sharded(num_bytes: int, layout: Layout, *, ranks: int) -> int:
    if layout.distributed_optimizer:
        return -(-num_bytes // ranks)
    return num_bytes


def model_state(num_params: int, layout: Layout, *, expert_params: int = 0) -> ModelState:
    """:class:`ModelState` for ``num_params`` parameters on one rank (its stage's shard,
    :func:`k15_megatron.plan.params.stage_parameters`, ``.total``) under ``layout``, of which
    ``expert_params`` are routed experts (optimizer sharded over DP x CP / EP ranks, the rest
    over DP x CP)."""
    grad_bytes = FP32 if (layout.grad_reduce_in_fp32 or layout.dtype == "fp32") else layout.dtype_bytes
    per_param = (2 if layout.optimizer == "adam" else 1) * FP32
    master = 0 if layout.dtype == "fp32" else FP32
    dense, dense_ranks = num_params - expert_params, layout.data * layout.context
    return ModelState(
        weights=num_params * layout.dtype_bytes, gradients=num_params * grad_bytes,
        master=(_sharded(master * dense, layout, ranks=dense_ranks)
                + _sharded(master * expert_params, layout, ranks=layout.expert_data)),
        moments=(_sharded(per_param * dense, layout, ranks=dense_ranks)
                 + _sharded(per_param * expert_params, layout, ranks=layout.expert_data)))
