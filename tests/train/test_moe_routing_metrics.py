"""Mixture of experts in the RL update (EP=2 = DP=2, gloo, tiny Qwen3-MoE): the router's
load-balancing loss reaches the gradients with its configured coefficient, and the routing
metrics equal a float64 recomputation from each router's input.

One 2-process launch. Each rank runs ``update_policy`` twice on the same batch with a learning
rate of 0 (the weights never change, the gradients stay in ``main_grad``): once with
``moe_aux_loss_coeff = C``, once with 0. Forward hooks keep every training-mode router input
x [T, 1, H] of the first run. The reference, in float64 from x and the router weight W [E, H]:
per micro-batch p = softmax(x W^T), n_e = tokens whose top-k holds e, and Megatron's switch
loss aux = E / (k T^2) sum_e (sum_x p(x, e)) n_e (moe_utils.switch_load_balancing_loss_func);
the step's aux objective on rank d is C / M_d sum_mb aux_mb (Megatron's schedule scales the aux
gradient by CP / M), and DDP averages over the data-parallel ranks. Each rank runs 2 packed
micro-batches of different token counts (one group each); expert parallelism needs the same
number of forward passes on every EP rank (each runs the dispatcher's all-to-all). The z-loss
(coefficient set in both runs) is checked as a metric only: mean over tokens of
logsumexp(x W^T)^2 per micro-batch. A token budget that gives the two EP ranks different
micro-batch counts (it hung before) is evened out by splitting: the same training micro-batches
and gradients as the coefficient-0 run.
"""

from __future__ import annotations

import types

import torch
from distributed import run_distributed
from tooling import megatron_from_hf, single_segment_batch

K, TAU, COEFF, Z_COEFF = 2, 0.1, 0.5, 1e-3


def _batch(vocab: int):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, vocab, (8, 12), generator=g)
    lengths = torch.tensor([9, 5, 7, 9, 3, 8, 6, 9])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0])
    return single_segment_batch(ids, lengths, rewards, group_size=K, prompt_tokens=3, generator=g)


def _reference(inputs: list[torch.Tensor], weight: torch.Tensor, *, topk: int) -> dict:
    """float64 routing statistics and the aux objective's gradient of one rank's micro-batches."""
    w = weight.detach().double().requires_grad_()
    num_experts = w.shape[0]
    counts = torch.zeros(num_experts, dtype=torch.float64)
    entropy, tokens, aux, z = 0.0, 0, [], []
    for x in inputs:
        logits = x.reshape(-1, x.shape[-1]).double() @ w.T
        p = torch.softmax(logits, -1)
        n = torch.zeros_like(p).scatter(1, p.topk(topk, dim=-1).indices, 1.0).sum(0)
        t = logits.shape[0]
        aux.append(num_experts / (topk * t * t) * (p.sum(0) * n).sum())
        z.append(float((torch.logsumexp(logits, -1) ** 2).mean()))  # ST-MoE z-loss, unweighted
        counts += n
        entropy += float(-(p * torch.log_softmax(logits, -1)).sum())
        tokens += t
    objective = COEFF * torch.stack(aux).mean()
    (grad,) = torch.autograd.grad(objective, w)
    return {"counts": counts, "entropy": entropy, "tokens": tokens, "aux_mean": float(torch.stack(aux).mean()),
            "z_mean": sum(z) / len(z), "grad": grad, "micro_batches": len(inputs)}


def _worker(rank, world_size, hf_dir):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router import TopKRouter

    from k15_megatron.config.rl import RLConfig
    from k15_megatron.train.policy_update import update_policy

    arch, model, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, ep=2, seed=3, lr=0.0, clip_grad=0.0)
    assert ps.get_expert_model_parallel_world_size() == 2 and ps.get_data_parallel_world_size() == 2
    layout = types.SimpleNamespace(dp_rank=ps.get_data_parallel_rank(), dp_size=2, tp_size=1)
    trainer = types.SimpleNamespace(layout=layout, chunks=chunks, optimizer=optimizer, scheduler=scheduler, arch=arch)
    routers = {m.layer_number: m for m in model.modules() if isinstance(m, TopKRouter)}
    inputs = {n: [] for n in routers}

    def keep_input(module, args, output):
        if module.training and torch.is_grad_enabled():
            inputs[module.layer_number].append(args[0].detach().clone())

    for router in routers.values():
        router.register_forward_hook(keep_input)
    assert model.config.moe_router_load_balancing_type == "aux_loss"
    model.config.moe_z_loss_coeff = Z_COEFF  # in both runs: its gradient cancels in their difference
    cfg = RLConfig(group_size=K, tau=TAU, reference="recompute", groups_per_micro_batch=1,
                   logprob_chunk_tokens=8, updates_per_iteration=1)
    batch = _batch(arch.vocab_size)
    runs = {}
    for coeff in (COEFF, 0.0):
        model.config.moe_aux_loss_coeff = coeff
        for kept in inputs.values():
            kept.clear()
        metrics = update_policy(trainer, batch, cfg)
        runs[coeff] = {"metrics": metrics,
                       "grads": {n: r.weight.main_grad.detach().clone() for n, r in routers.items()},
                       "references": {n: _reference(inputs[n], routers[n].weight, topk=routers[n].topk)
                                      for n in routers}}
    # A token budget that cuts rank 0's share (42 tokens) in two and leaves rank 1's (38) whole:
    # rank 1 splits its micro-batch at the group boundary so both EP ranks run 2 forward passes
    # (different counts hung), the same micro-batches as the coefficient-0 run above.
    uneven = RLConfig(group_size=K, tau=TAU, reference="recompute", groups_per_micro_batch=2,
                      logprob_chunk_tokens=8, updates_per_iteration=1)
    model.config.moe_aux_loss_coeff = 0.0
    uneven_metrics = update_policy(trainer, batch, uneven, micro_batch_tokens=40)
    runs["uneven"] = {"metrics": uneven_metrics,
                      "grads": {n: r.weight.main_grad.detach().clone() for n, r in routers.items()}}
    return {"runs": runs, "num_layers": model.config.num_layers}


def test_moe_aux_loss_gradient_and_routing_metrics(tiny_moe_hf_dirs):
    results = run_distributed(_worker, 2, tiny_moe_hf_dirs["qwen3_moe"], timeout_s=300)
    with_aux, without = results[0]["runs"][COEFF], results[0]["runs"][0.0]
    layers = sorted(with_aux["references"])
    assert layers and len(layers) < results[0]["num_layers"]  # the tiny model's first layer is dense
    assert [r["runs"][COEFF]["references"][layers[0]]["micro_batches"] for r in results] == [2, 2]
    for result in results:
        uneven, without_aux = result["runs"]["uneven"], result["runs"][0.0]
        assert uneven["metrics"]["train/micro_batches_per_update"] == 2.0
        for n in layers:  # the recompute's micro-batches differ (rows, not groups): float32 rounding
            torch.testing.assert_close(uneven["grads"][n], without_aux["grads"][n], rtol=1e-5, atol=1e-7)

    # The aux loss's gradient, (C run) - (0 run), on the LAST MoE layer's router weight after
    # DDP's average: only that layer's own aux loss reaches it (an earlier router also gets the
    # later layers' aux gradients through the hidden states, which the reference holds fixed).
    last = layers[-1]
    expected = sum(r["runs"][COEFF]["references"][last]["grad"] for r in results) / 2
    got = with_aux["grads"][last].double() - without["grads"][last].double()
    # float32 gradients of size |g|: their difference carries ~1e-7 |g| rounding per operation,
    # summed over a few hundred terms; 1e-5 of the largest entry bounds it (seen: ~4e-8).
    scale = max(float(with_aux["grads"][last].abs().max()), float(expected.abs().max()))
    assert float(expected.abs().max()) > 0.1 * scale  # the aux term is a visible part of the gradient
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)

    for n in layers:
        refs = [r["runs"][COEFF]["references"][n] for r in results]
        i = n - 1
        counts = sum(ref["counts"] for ref in refs)
        expected_metrics = {
            f"moe/layer_{i}/load_imbalance": float(counts.max() / counts.mean()),
            f"moe/layer_{i}/router_entropy": sum(ref["entropy"] for ref in refs) / sum(ref["tokens"] for ref in refs),
            f"moe/layer_{i}/dropped_fraction": 0.0,
            f"moe/layer_{i}/load_balancing_loss": sum(ref["aux_mean"] for ref in refs) / 2,
            f"moe/layer_{i}/z_loss": sum(ref["z_mean"] for ref in refs) / 2,
        }
        for result in results:
            metrics = result["runs"][COEFF]["metrics"]
            for key, value in expected_metrics.items():
                assert abs(metrics[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, metrics[key], value)
            # Without the coefficient no aux loss is attached or logged; routing metrics stay.
            assert f"moe/layer_{i}/load_balancing_loss" not in result["runs"][0.0]["metrics"]
            key = f"moe/layer_{i}/load_imbalance"
            assert result["runs"][0.0]["metrics"][key] == metrics[key]

    for result in results:
        metrics = result["runs"][COEFF]["metrics"]
        assert not any(key.startswith("moe/layer_0/") for key in metrics)  # the dense layer
        per_layer = [metrics[f"moe/layer_{n - 1}/load_balancing_loss"] for n in layers]
        assert abs(metrics["moe/aux_loss"] - COEFF * sum(per_layer)) <= 1e-9
        z_total = Z_COEFF * sum(metrics[f"moe/layer_{n - 1}/z_loss"] for n in layers)
        assert abs(metrics["moe/z_loss"] - z_total) <= 1e-12
        assert metrics["moe/load_imbalance_max"] == max(metrics[f"moe/layer_{n - 1}/load_imbalance"] for n in layers)
        assert metrics["moe/dropped_fraction"] == 0.0
        assert "moe/aux_loss" not in result["runs"][0.0]["metrics"]
    moe = [{k: v for k, v in r["runs"][COEFF]["metrics"].items() if k.startswith("moe/")} for r in results]
    assert moe[0] == moe[1]
