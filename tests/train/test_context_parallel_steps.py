"""Context parallelism through the trainer: one SFT step and the log-prob recompute give the same
result under every layout (4 gloo processes, one launch shared with test_policy_update_cp.py,
Megatron's parallel state re-initialised per layout; float32, tiny Qwen2 with its HF weights).

- SFT step: one global batch of 8 examples of mixed lengths, split over the data-parallel
  ranks in order and into 2 micro-batches per rank; plain SGD with lr 1 (the new weights are the
  old ones minus the gradient, so they compare gradients without Adam's sign-like first step).
  The new weights under CP=2 (DP=2), TP=2 x CP=2 and PP=2 x CP=2 (DP=1) equal those of CP=1
  (DP=4), and packed (THD) micro-batches give the same weights as padded [B, S] rows (each
  example one right-padded row, loss mask 0 on padding): the step is the token mean over the
  whole global batch whatever the split.
- Recompute: sequence_token_logprobs of rows of mixed real lengths (right padding cut off, a
  token budget that puts one or several rows in a micro-batch) under CP=2, TP=2 x CP=2 and
  PP=2 x CP=2 equals CP=1 and transformers' float64 log-probs of each row alone.
"""

from __future__ import annotations

import pytest
import torch

# (tensor, pipeline, context) over 4 processes; the rest is data parallelism.
LAYOUTS = {"CP1": (1, 1, 1), "CP2": (1, 1, 2), "TP2xCP2": (2, 1, 2), "PP2xCP2": (1, 2, 2)}
EXAMPLE_LENGTHS = ((3, 9), (6, 2), (11, 12), (2, 4), (5, 17), (4, 5), (9, 3), (2, 6))  # (prompt, response)
ROW_LENGTHS = (29, 7, 16, 2, 12, 23)  # recompute: real tokens of each row of a [6, 29] batch
WEIGHT_TOL = 2e-6  # max |difference| of new weights (measured: 6e-7; the step moves them by 0.3)
LOGPROB_TOL = 2e-5  # vs CP=1 and vs transformers float64 (measured: 5e-6)


def _build(hf_dir: str, tp: int, pp: int, cp: int):
    """(Re)start Megatron's parallel state with this layout and build the model with its HF
    weights, wrapped for training with plain SGD (lr 1, no clipping)."""
    from megatron.core import parallel_state as ps

    from k15_megatron.checkpoint.model_weights import load_hf_weights
    from k15_megatron.config import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.optimizer import build_training_objects

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    parallel, precision = ParallelConfig(tensor=tp, pipeline=pp, context=cp), PrecisionConfig(dtype="fp32")
    initialize(parallel, seed=5)
    arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
    padded = padded_vocab_size(arch.vocab_size, 128, tp)
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=precision, padded_vocab=padded)
    load_hf_weights(model, hf_dir, arch, padded)
    chunks, optimizer, scheduler = build_training_objects(
        model, optim_cfg=OptimConfig(lr=1.0, clip_grad=0.0, optimizer="sgd", weight_decay=0.0),
        precision_cfg=precision, num_steps=10)
    return arch, model, chunks, optimizer, scheduler


def _examples(vocab_size: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(5, vocab_size, (p,), generator=g).tolist(),
             torch.randint(5, vocab_size, (r,), generator=g).tolist()) for p, r in EXAMPLE_LENGTHS]


def _step_micro_batches(examples, *, packed: bool, multiple: int):
    """This data-parallel rank's share of the global batch, in two micro-batches."""
    from megatron.core import parallel_state as ps

    from k15_megatron.data.packing import pack_examples
    from k15_megatron.jobs.sft import sft_micro_batches

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = len(examples) // dp
    mine = examples[rank * share:(rank + 1) * share]
    rows = [pack_examples([example], seq_length=32, pad_id=0)[0] for example in mine]  # one example a row
    if packed:
        return sft_micro_batches(rows, micro_batch_size=share // 2, multiple=multiple)
    batches = []
    for start in range(0, share, share // 2):
        part = rows[start:start + share // 2]
        batches.append({"input_ids": torch.tensor([r.input_ids for r in part]),
                        "labels": torch.tensor([r.labels for r in part]),
                        "loss_mask": torch.tensor([r.loss_mask for r in part], dtype=torch.float32),
                        "position_ids": torch.arange(32).expand(len(part), -1)})
    return batches


def _new_weights(hf_dir, layout, examples, *, packed: bool):
    from k15_megatron.checkpoint.model_weights import iter_hf_tensors
    from k15_megatron.train.schedule import packing_multiple
    from k15_megatron.train.step import train_step

    arch, model, chunks, optimizer, scheduler = _build(hf_dir, *layout)
    micro = _step_micro_batches(examples, packed=packed, multiple=packing_multiple(chunks))
    metrics = train_step(chunks, optimizer, scheduler, micro)
    return metrics["loss"], dict(iter_hf_tensors(model, arch))


def _layouts_worker(rank, world_size, hf_dir):
    from k15_megatron.train.logprobs import sequence_token_logprobs

    out = {}
    ids = torch.randint(0, 1000, (len(ROW_LENGTHS), max(ROW_LENGTHS)), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor(ROW_LENGTHS)
    for name, layout in LAYOUTS.items():
        arch, _, chunks, _, _ = _build(hf_dir, *layout)
        ids = ids % arch.vocab_size
        lp = sequence_token_logprobs(chunks, ids, vocab_size=arch.vocab_size, lengths=lengths,
                                     micro_batch_size=3, micro_batch_tokens=40, chunk_size=7)
        examples = _examples(arch.vocab_size)
        packed_loss, packed = _new_weights(hf_dir, layout, examples, packed=True)
        padded_loss, padded = _new_weights(hf_dir, layout, examples, packed=False)
        out[name] = {"logprobs": lp.cpu(), "packed": packed, "padded": padded, "packed_loss": packed_loss,
                     "padded_loss": padded_loss}
    out["ids"] = ids
    return out


def _hf_row_logprobs(hf_dir: str, ids: torch.Tensor, lengths) -> torch.Tensor:
    """float64 log-probs of each row alone (its real tokens only), [B, T-1], 0 past each row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64)
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.float64)
    with torch.no_grad():
        for row, n in enumerate(lengths):
            row_ids = ids[row:row + 1, :n]
            logits = model(row_ids).logits.double()
            out[row, :n - 1] = torch.log_softmax(logits[0, :-1], -1).gather(-1, row_ids[0, 1:, None])[:, 0]
    return out


def _hf_weights(hf_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
            .state_dict().items()}


def _merged(per_rank, name, key):
    """The full HF tensors of a layout: the union over its ranks (pipeline stages hold different layers)."""
    merged = {}
    for result in per_rank:
        merged.update(result[name][key])
    return merged


@pytest.mark.distributed
@pytest.mark.slow  # the shared launch: about 75 s
def test_sft_step_and_recompute_equal_across_context_parallel_layouts(tiny_hf_dirs, context_parallel_launch):
    hf_dir = tiny_hf_dirs["qwen2"]
    per_rank = context_parallel_launch["steps"]
    reference = _merged(per_rank, "CP1", "packed")
    hf = _hf_row_logprobs(hf_dir, per_rank[0]["ids"], ROW_LENGTHS)
    for name in LAYOUTS:
        losses = {(r[name]["packed_loss"], r[name]["padded_loss"]) for r in per_rank}
        assert len(losses) == 1, f"{name}: ranks disagree on the step's loss: {losses}"
        (packed_loss, padded_loss), = losses
        assert abs(packed_loss - per_rank[0]["CP1"]["packed_loss"]) < 1e-5 and abs(padded_loss - packed_loss) < 1e-5
        for kind in ("packed", "padded"):
            weights = _merged(per_rank, name, kind)
            assert weights.keys() == reference.keys(), f"{name} {kind}: other tensors than CP=1"
            err = max((weights[k] - reference[k]).abs().max().item() for k in reference)
            assert err < WEIGHT_TOL, f"{name} {kind}: new weights differ from CP=1 packed by {err:.2e}"
        for rank, result in enumerate(per_rank):
            lp = result[name]["logprobs"]
            assert lp.shape == hf.shape and lp.dtype == torch.float32
            err_cp1 = (lp - per_rank[0]["CP1"]["logprobs"]).abs().max().item()
            err_hf = (lp.double() - hf).abs().max().item()
            assert err_cp1 < LOGPROB_TOL and err_hf < LOGPROB_TOL, \
                f"{name} rank {rank}: recompute differs from CP=1 by {err_cp1:.2e}, from transformers by {err_hf:.2e}"
    # The step moved the weights by far more than the tolerance, so the comparison can fail.
    initial = _hf_weights(hf_dir)
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference)
    assert moved > 1000 * WEIGHT_TOL, f"the SGD step moved the weights by only {moved:.2e}"
