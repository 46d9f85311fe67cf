"""A few Megatron training steps (Adam, grad clipping on) lower the loss on a fixed batch.

The first step's loss is transformers' cross-entropy on the same HF model (over the tokenizer's
vocabulary: the step masks out the output layer's padding rows, k15_megatron.train.vocab_padding),
and those rows, zero at import, get no gradient and stay exactly zero through the Adam steps.

Runs the library's own path: initialize -> build model -> load HF weights -> Megatron DDP +
optimizer + LR schedule -> train_step over two micro-batches, under TP=2 and PP=2 on gloo; and
DP replicas and the two copies of a tied embedding stay identical. One 2-process launch runs
every case, Megatron's parallel state re-initialised between them.
"""

import pytest
import torch
from distributed import run_cases
from tooling import megatron_from_hf


def _tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))


def _train_worker(rank, world_size, hf_dir, tp, pp):
    from megatron.core import parallel_state as ps

    from k15_megatron.train.step import train_step
    from k15_megatron.train.vocab_padding import real_vocab_logits

    arch, model, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, tp=tp, pp=pp, seed=7, lr=1e-3)
    tokens = _tokens(arch.vocab_size)
    positions = torch.arange(32).expand(2, -1)
    micro_batches = [
        {"input_ids": tokens[i:i + 2, :-1], "position_ids": positions, "labels": tokens[i:i + 2, 1:]}
        for i in (0, 2)
    ]
    with real_vocab_logits(chunks, arch.vocab_size):
        steps = [train_step(chunks, optimizer, scheduler, micro_batches) for _ in range(5)]
    padding_rows = None  # this rank's output-layer rows past the tokenizer's vocabulary
    if ps.is_pipeline_last_stage():
        weight = model.output_layer.weight
        first = max(0, arch.vocab_size - ps.get_tensor_model_parallel_rank() * weight.shape[0])
        padding_rows = weight[first:].detach().clone()
    return {"steps": steps, "padding_rows": padding_rows}


@pytest.fixture(scope="module")
def runs(tiny_hf_dirs):
    """case -> [rank 0's result, rank 1's result]"""
    return run_cases(2, {"TP2": (_train_worker, (tiny_hf_dirs["llama"], 2, 1)),
                         "PP2": (_train_worker, (tiny_hf_dirs["llama"], 1, 2)),
                         "DP2": (_replica_worker, (tiny_hf_dirs["qwen3"], 1)),
                         "tied PP2": (_replica_worker, (tiny_hf_dirs["qwen2"], 2))})


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["TP2", "PP2"])
def test_training_steps_lower_the_loss(runs, layout, tiny_hf_dirs):
    from transformers import AutoModelForCausalLM

    per_rank = [result["steps"] for result in runs[layout]]
    losses = [m["loss"] for m in per_rank[0]]
    assert [m["loss"] for m in per_rank[1]] == losses, "ranks disagree on the loss"
    assert all(not m["skipped"] for m in per_rank[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dirs["llama"], dtype=torch.float32)
    tokens = _tokens(model.config.vocab_size)
    with torch.no_grad():
        reference = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).logits.flatten(0, 1),
                                                      tokens[:, 1:].flatten()).item()
    assert abs(losses[0] - reference) < 1e-5 * reference, (losses[0], reference)
    padding = [r["padding_rows"] for r in runs[layout] if r["padding_rows"] is not None]
    assert sum(p.shape[0] for p in padding) > 0 and all(torch.equal(p, torch.zeros_like(p)) for p in padding)
    # A random-weight model starts near log(vocab); five Adam steps on one batch must cut it clearly.
    assert losses[0] > 4.0
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall: {losses}"
    assert all(b < a for a, b in zip(losses, losses[1:])), f"loss not monotone on a fixed batch: {losses}"


def _replica_worker(rank, world_size, hf_dir, pp):
    """Train with different data per DP rank (DP=2) or a tied embedding split over PP=2, then
    return what must stay identical: parameters across DP replicas / the two embedding copies."""
    from megatron.core import parallel_state as ps

    from k15_megatron.train.step import train_step

    arch, model, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, pp=pp, seed=7, lr=1e-2)
    # Different tokens on each DP rank; the same on the two stages of a pipeline.
    data_seed = ps.get_data_parallel_rank() + 100
    tokens = torch.randint(0, arch.vocab_size, (2, 17), generator=torch.Generator().manual_seed(data_seed))
    batch = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(16).expand(2, -1)}]
    for _ in range(3):
        train_step(chunks, optimizer, scheduler, batch)
    if pp == 1:
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    if ps.is_pipeline_first_stage():
        return {"embedding": model.embedding.word_embeddings.weight.detach().clone()}
    return {"embedding": model.output_layer.weight.detach().clone()}


@pytest.mark.distributed
def test_data_parallel_replicas_stay_identical(runs):
    first, second = runs["DP2"]
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"DP replicas diverged on {name}"


@pytest.mark.distributed
def test_tied_embedding_copies_stay_identical_across_pipeline_stages(runs):
    first_stage, last_stage = runs["tied PP2"]
    assert torch.equal(first_stage["embedding"], last_stage["embedding"]), \
        "the last stage's copy of the tied embedding drifted from the first stage's"
