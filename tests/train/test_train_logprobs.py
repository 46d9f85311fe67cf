"""The trainer's log-prob head on a real Megatron GPTModel, under TP=2 and PP=2 (gloo, one launch).

- The recompute in packed micro-batches equals the whole-batch recompute and transformers'
  float64 log-probs of the same weights, also when the rows do not divide into micro-batches
  (the last one holds fewer rows: no padding rows are run); no forward ever sees more tokens
  than the micro-batch size's rows, and the output layer hands the loss its input (hidden
  states), never logits [B, S, V/TP].
- Gradients through the hidden-state head (what the RL loss uses) equal those through Megatron's
  own logits output layer, for every parameter (the tied embedding included).
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_cases
from tooling import megatron_from_hf


def _hf_logprobs(hf_dir: str, ids: torch.Tensor) -> torch.Tensor:
    """float64 log p(ids[:, t] | ids[:, :t]) from transformers, [B, T-1]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64)
    with torch.no_grad():
        logits = model(ids).logits.double()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def _main_grads(model) -> dict:
    return {n: (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).detach().clone()
            for n, p in model.named_parameters()}


def _loss_through(chunks, micro_batches, loss_fn, model):
    from k15_megatron.train.schedule import forward_backward

    for chunk in chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    forward_backward(chunks, micro_batches, loss_fn)
    return _main_grads(model)


def _head_worker(rank, world_size, hf_dir, tp, pp):
    from megatron.core import parallel_state as ps

    from k15_megatron.rl.logprobs import token_logprobs
    from k15_megatron.train.logprobs import hidden_state_output, sequence_token_logprobs

    arch, model, chunks, _, _ = megatron_from_hf(hf_dir, tp=tp, pp=pp, seed=3)
    ids = torch.randint(0, arch.vocab_size, (6, 13), generator=torch.Generator().manual_seed(11))
    rows, widths = [], []  # rows: the tokens each forward sees (packed micro-batches are [1, T])
    model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[1]))
    if ps.is_pipeline_last_stage():  # True: the output layer passed its input (hidden states) on
        model.output_layer.register_forward_hook(lambda m, args, out: widths.append(out[0] is args[0]))
    whole = sequence_token_logprobs(chunks, ids, vocab_size=arch.vocab_size, chunk_size=5)
    rows.clear(), widths.clear()
    micro = sequence_token_logprobs(chunks, ids, vocab_size=arch.vocab_size, micro_batch_size=2, chunk_size=5)
    out = {"whole": whole, "micro": micro, "hf": _hf_logprobs(hf_dir, ids), "rows": list(rows),
           "widths": list(widths), "hidden": arch.hidden_size, "last_stage": ps.is_pipeline_last_stage()}
    rows.clear()  # 5 rows of 13 tokens, at most 2 a forward: forwards of 26, 26 and 13 tokens
    out["uneven"] = sequence_token_logprobs(chunks, ids[:5], vocab_size=arch.vocab_size, micro_batch_size=2,
                                            chunk_size=5)
    out["uneven_rows"] = list(rows)

    # Gradients: the hidden-state head vs Megatron's logits output layer, same weighted loss.
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    weights = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(12).expand(2, -1)
    batches = [{"input_ids": ids[i:i + 2, :-1], "position_ids": positions, "targets": ids[i:i + 2, 1:],
                "w": weights[i:i + 2]} for i in (0, 2, 4)]

    def logits_loss(mb, logits):
        lp = token_logprobs(logits, mb["targets"], group=group, chunk_size=5, vocab_size=arch.vocab_size)
        return (lp * mb["w"]).sum(), torch.tensor(1, dtype=torch.int), {}

    out["grads_logits"] = _loss_through(chunks, batches, logits_loss, model)
    with hidden_state_output(chunks) as head:
        def hidden_loss(mb, hidden):
            lp = head.token_logprobs(hidden, mb["targets"], vocab_size=arch.vocab_size, chunk_size=5)
            return (lp * mb["w"]).sum(), torch.tensor(1, dtype=torch.int), {}

        out["grads_hidden"] = _loss_through(chunks, batches, hidden_loss, model)
    widths.clear()
    _loss_through(chunks, batches, logits_loss, model)  # the output layer is restored on exit
    out["restored_widths"] = list(widths)
    return out


LAYOUTS = {"TP2": (2, 1), "PP2": (1, 2)}


@pytest.fixture(scope="module")
def per_layout(tiny_hf_dirs):
    return run_cases(2, {name: (_head_worker, (tiny_hf_dirs["qwen2"], tp, pp)) for name, (tp, pp) in LAYOUTS.items()})


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_recompute_in_micro_batches_and_hidden_head_gradients(per_layout, layout):
    for rank, r in enumerate(per_layout[layout]):
        assert r["micro"].shape == (6, 12) and r["micro"].dtype == torch.float32
        assert torch.allclose(r["micro"], r["whole"], atol=1e-6), f"rank {rank}: micro-batched != whole batch"
        err = (r["micro"].double() - r["hf"]).abs().max().item()
        assert err < 1e-4, f"rank {rank}: recompute vs transformers float64: max |diff| {err:.2e}"
        assert r["rows"] == [26, 26, 26], f"rank {rank}: forwards saw {r['rows']} tokens, micro-batch is 2 rows"
        assert r["uneven"].shape == (5, 12) and torch.allclose(r["uneven"], r["whole"][:5], atol=1e-6), \
            f"rank {rank}: 5 rows in micro-batches of at most 2 != the whole batch"
        assert r["uneven_rows"] == [26, 26, 13], f"rank {rank}: uneven split ran forwards of {r['uneven_rows']} tokens"
        if r["last_stage"]:
            assert r["widths"] and all(r["widths"]), f"rank {rank}: the output layer formed logits"
            assert r["restored_widths"] and not any(r["restored_widths"]), "the logits output layer was not restored"
        for name, g in r["grads_logits"].items():
            h = r["grads_hidden"][name]
            err = (h - g).abs().max().item()  # float32 sums in another order: relative to the scale
            assert err <= 1e-5 * g.abs().max().item() + 1e-7, f"rank {rank} {name}: max |diff| {err:.2e}"
        assert any(g.abs().sum() > 0 for g in r["grads_hidden"].values())
