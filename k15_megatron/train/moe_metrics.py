"""Per-layer routing metrics of a Megatron mixture-of-experts model over one training step.

``with RoutingMetrics(model_chunks) as routing: <train steps>`` then ``routing.global_metrics()``.

What it owns: watching each ``TopKRouter`` of this rank while the model trains (per instance:
the router's ``routing`` method is wrapped for the duration of the ``with`` block and restored
after), reading Megatron's own aux-loss tracker
(``moe_utils.get_moe_layer_wise_logging_tracker``: the per-layer load-balancing loss and z-loss
its routers record), and reducing both over the ranks. Only forward passes in training mode with
autograd on count (the policy update's forward/backward, SFT's step), the same condition under
which Megatron's routers add their auxiliary losses; the no-grad log-prob recompute does not.

How the auxiliary loss reaches the gradients (not done here): each router attaches
``coeff x load_balancing_loss`` of its micro-batch to its output through
``MoEAuxLossAutoScaler``, whose backward scale Megatron's pipeline schedule sets to
``grad_scale x CP / M`` (M micro-batches, ``calculate_per_token_loss`` off, as in
:mod:`k15_megatron.train.step` and :mod:`k15_megatron.train.policy_update`); with DDP's mean over
the DP x CP ranks the step minimises ``main loss + coeff x sum over MoE layers of the mean over
each data-parallel rank's micro-batches (then over ranks) of the layer's load-balancing loss``.
``tests/train/test_moe_routing_metrics.py`` checks that gradient against a float64 reference.

Metrics (``global_metrics``; layer index i = Megatron's ``layer_number - 1``, the Hugging Face
``model.layers.{i}``), every token the router saw counted, packing pads included:

* ``moe/layer_{i}/load_balancing_loss``: Megatron's switch load-balancing loss
  E / (k T^2) sum_e (sum_x p(x, e)) n_e of a micro-batch (Switch Transformer,
  arXiv:2101.03961; ``moe_utils.switch_load_balancing_loss_func``), unweighted, averaged over a
  rank's micro-batches and then over the data-parallel ranks (the weighting its gradient gets);
  ``moe/aux_loss`` = coeff x its sum over layers (the term added to the loss). Only when
  ``moe_aux_loss_coeff > 0``. The same for ``moe/layer_{i}/z_loss`` (mean over tokens of
  logsumexp(logits)^2) and ``moe/z_loss`` when ``moe_z_loss_coeff`` is set;
* ``moe/layer_{i}/load_imbalance``: max over experts of the tokens routed to an expert over
  their mean (1 = balanced, E / k at worst), over the whole step; ``moe/load_imbalance_max``
  the largest over layers;
* ``moe/layer_{i}/router_entropy``: mean over tokens of the entropy (nats) of the softmax over
  all E experts of the router logits; ``moe/router_entropy`` its mean over layers;
* ``moe/layer_{i}/dropped_fraction``: the share of the k x T token-expert assignments that
  capacity-based token dropping removed (counted from the routing map; 0 without
  ``moe_expert_capacity_factor``, the default here); ``moe/dropped_fraction`` over layers.

All are ratios, so recomputed forwards (``parallel.recompute=full`` re-runs a layer's forward
during backward, counting its tokens twice) leave them unchanged. Dense models: no metrics.
"""

from __future__ import annotations

import torch

from k15_megatron.parallel.device import compute_device

_LOSS_NAMES = (("load_balancing_loss", "moe_aux_loss_coeff", "aux_loss"), ("z_loss", "moe_z_loss_coeff", "z_loss"))


def _config(model_chunks):
    from k15_megatron.models.gpt import unwrap_model

    return unwrap_model(list(model_chunks)[0]).config


def _routers(model_chunks) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]


class RoutingMetrics:
    """Collects this rank's routing statistics per layer while in a ``with`` block (see the
    module docstring). ``stats`` [num_layers, E + 4] float64 on the compute device: tokens per
    expert [E], tokens, summed router entropy, dropped assignments, router calls."""

    def __init__(self, model_chunks):
        self.chunks = list(model_chunks)
        config = _config(self.chunks)
        self.config = config
        self.enabled = bool(config.num_moe_experts)
        self.num_experts = config.num_moe_experts or 0
        self.num_layers = config.num_layers + (config.mtp_num_layers or 0)
        self.stats = torch.zeros(self.num_layers, self.num_experts + 4, dtype=torch.float64, device=compute_device())
        self._routers = []

    def __enter__(self):
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        if self.enabled:
            clear_aux_losses_tracker()
            self._routers = _routers(self.chunks)
            for router in self._routers:
                router.routing = self._watch(router)
        return self

    def __exit__(self, *exc):
        for router in self._routers:
            del router.routing  # the class's method again
        self._routers = []
        return False

    def _watch(self, router):
        original = type(router).routing.__get__(router)

        def routing(logits, *args, **kwargs):
            probs, routing_map = original(logits, *args, **kwargs)
            if router.training and torch.is_grad_enabled():
                self._add(router.layer_number, logits.detach(), routing_map.detach(), topk=router.topk)
            return probs, routing_map
        return routing

    @torch.no_grad()
    def _add(self, layer_number: int, logits: torch.Tensor, routing_map: torch.Tensor, *, topk: int) -> None:
        logits = logits.reshape(-1, self.num_experts).double()
        row = self.stats[layer_number - 1]
        counts = routing_map.reshape(-1, self.num_experts).sum(dim=0).double()
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum()
        tokens = torch.tensor(float(logits.shape[0]), dtype=torch.float64, device=logits.device)
        extra = torch.stack([tokens, entropy, topk * tokens - counts.sum(), torch.ones_like(tokens)])
        row += torch.cat([counts, extra]).to(row.device)

    def _loss_means(self) -> torch.Tensor:
        """[num_layers, 2] this rank's mean per micro-batch of Megatron's tracked load-balancing
        loss and z-loss (the load-balancing partials summed over the router's TP x CP group,
        as Megatron reduces them), 0 where not tracked; resets the tracker."""
        from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                             get_moe_layer_wise_logging_tracker)

        tracker = get_moe_layer_wise_logging_tracker()
        out = torch.zeros(self.num_layers, 2, dtype=torch.float64, device=compute_device())
        for column, (name, _, _) in enumerate(_LOSS_NAMES):
            if name not in tracker:
                continue
            values = tracker[name]["values"].detach().clone()
            group = tracker[name].get("reduce_group")
            if group is not None and group.size() > 1:
                torch.distributed.all_reduce(values, group=group)
            out[:, column] = values.double().to(out.device)
        clear_aux_losses_tracker()
        return out / self.stats[:, -1:].clamp(min=1)

    def global_metrics(self) -> dict[str, float]:
        """The metrics of the module docstring over every rank's forward passes since the last
        call, equal on every rank (collective over data-, context- and pipeline-parallel ranks,
        and tensor-parallel ones under sequence parallelism); {} for a dense model. Resets."""
        from megatron.core import parallel_state as ps

        if not self.enabled:
            return {}
        stats = torch.cat([self.stats, self._loss_means()], dim=1)
        groups = [ps.get_data_parallel_group(with_context_parallel=True)]
        if self.config.sequence_parallel:
            groups.append(ps.get_tensor_model_parallel_group())
        replicas = 1
        for group in groups:
            replicas *= torch.distributed.get_world_size(group)
            if torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(stats, group=group)
        stats[:, -2:] /= replicas  # means of the ranks' loss means; the token statistics stay sums
        if ps.get_pipeline_model_parallel_world_size() > 1:  # each stage holds its own layers
            torch.distributed.all_reduce(stats, group=ps.get_pipeline_model_parallel_group())
        self.stats.zero_()
        return self._format(stats.cpu())

    def _format(self, stats: torch.Tensor) -> dict[str, float]:
        e = self.num_experts
        counts, tokens, entropy, dropped, calls = (stats[:, :e], stats[:, e], stats[:, e + 1], stats[:, e + 2],
                                                   stats[:, e + 3])
        layers = [i for i in range(self.num_layers) if calls[i] > 0]
        if not layers:
            return {}
        out, totals = {}, {"imbalance": [], "entropy": [], "dropped": 0.0, "assignments": 0.0}
        for i in layers:
            imbalance = float(counts[i].max() / counts[i].mean().clamp(min=1e-30))
            mean_entropy = float(entropy[i] / tokens[i])
            assignments = float(dropped[i] + counts[i].sum())
            out[f"moe/layer_{i}/load_imbalance"] = imbalance
            out[f"moe/layer_{i}/router_entropy"] = mean_entropy
            out[f"moe/layer_{i}/dropped_fraction"] = float(dropped[i]) / assignments
            totals["imbalance"].append(imbalance)
            totals["entropy"].append(mean_entropy)
            totals["dropped"] += float(dropped[i])
            totals["assignments"] += assignments
        out["moe/load_imbalance_max"] = max(totals["imbalance"])
        out["moe/router_entropy"] = sum(totals["entropy"]) / len(layers)
        out["moe/dropped_fraction"] = totals["dropped"] / totals["assignments"]
        for column, (name, coeff_key, total_key) in enumerate(_LOSS_NAMES):
            coeff = getattr(self.config, coeff_key)
            if not coeff:
                continue
            values = stats[:, e + 4 + column]
            for i in layers:
                out[f"moe/layer_{i}/{name}"] = float(values[i])
            out[f"moe/{total_key}"] = float(coeff) * float(values[layers].sum())
        return out
