"""The portable core attention (models/attention.py) under packing and context parallelism.

One 2-process launch: the tiny Qwen3 model (GQA, QK-norm) runs a packed THD batch of mixed
lengths (5, 37, 101 tokens; one sequence longer than a query block would need with blocks of 16)
at CP=1 (each rank the whole batch) and at CP=2 (each rank its 2*CP chunks of every sequence).
Every token's logits are compared with transformers run on each sequence alone, and the
gradient of the word embeddings (summed over the CP group) with transformers' gradient of the
same loss. Tolerance: 1e-4 relative to the largest value (float32).
"""

import pytest
import torch
from distributed import run_distributed

LENGTHS = (5, 37, 101)


def _loss_weights(total: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, total)


def _reference(hf_dir, sequences, vocab):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    logits = [model(seq.unsqueeze(0)).logits[0] for seq in sequences]
    flat = torch.cat(logits)
    (flat[:, :vocab] * _loss_weights(flat.shape[0]).unsqueeze(1)).sum().backward()
    return logits, model.get_input_embeddings().weight.grad


def _worker(rank, world_size, hf_dir):
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    import k15_megatron.models.attention as attention
    from k15_megatron.checkpoint.model_weights import load_hf_weights
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.context import sequence_multiple
    from k15_megatron.parallel.device import compute_device
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.packed import cp_rank_share, pack_sequences

    attention.QUERY_BLOCK, attention.MASK_ELEMENTS = 16, 16 * 64  # several blocks, masks with offsets
    generator = torch.Generator().manual_seed(7)
    results = {}
    for cp in (1, 2):
        parallel = ParallelConfig(context=cp)
        initialize(parallel, seed=3)
        arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
        padded = padded_vocab_size(arch.vocab_size, 128, 1)
        model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                                padded_vocab=padded)
        load_hf_weights(model, hf_dir, arch, padded)
        # Token 0 is the HF model's padding_idx (zero embedding, no gradient in transformers).
        sequences = [torch.randint(1, arch.vocab_size, (n,), generator=generator) for n in LENGTHS]
        batch = pack_sequences([{"input_ids": s, "weight": torch.zeros(len(s))} for s in sequences],
                               multiple=sequence_multiple(cp_size=cp))
        flat_weights = _loss_weights(sum(LENGTHS))
        at = 0
        for i, n in enumerate(LENGTHS):  # the loss weight of each real token, 0 on padding
            start = int(batch["cu_seqlens_padded"][i])
            batch["weight"][0, start:start + n] = flat_weights[at:at + n]
            at += n
        batch["global_positions"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
        mine = cp_rank_share(batch, cp_size=cp, cp_rank=ps.get_context_parallel_rank())
        device = compute_device()
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch["cu_seqlens"].to(device),
                                 cu_seqlens_kv=batch["cu_seqlens"].to(device),
                                 cu_seqlens_q_padded=batch["cu_seqlens_padded"].to(device),
                                 cu_seqlens_kv_padded=batch["cu_seqlens_padded"].to(device),
                                 max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"])
        logits = model(mine["input_ids"].to(device), mine["position_ids"].to(device), None,
                       packed_seq_params=params)
        full_vocab = gather_from_tensor_model_parallel_region(logits)[0, :, :arch.vocab_size]
        (full_vocab * mine["weight"].to(device)[0].unsqueeze(1)).sum().backward()
        grad = model.embedding.word_embeddings.weight.grad[:arch.vocab_size].clone()
        if cp > 1:
            torch.distributed.all_reduce(grad, group=ps.get_context_parallel_group())
        results[cp] = {"positions": mine["global_positions"][0], "logits": full_vocab.detach().cpu(),
                       "grad": grad.cpu(), "cu_padded": batch["cu_seqlens_padded"], "sequences": sequences}
        ps.destroy_model_parallel()
    return results


@pytest.mark.parametrize("q_start", [0, 50])
def test_causal_blocks_match_float64_reference(monkeypatch, q_start):
    """Queries at [q_start, q_start+101) of a sequence against its keys [0, q_start+101), in
    blocks of 16 rows (grouped-query: 4 query heads, 2 key/value heads): output and gradients
    equal a float64 masked softmax."""
    import k15_megatron.models.attention as attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    monkeypatch.setattr(attention, "MASK_ELEMENTS", 16 * 64)
    g = torch.Generator().manual_seed(0)
    keys = q_start + 101
    q, k, v = (torch.randn(1, h, n, 8, generator=g, requires_grad=True) for h, n in ((4, 101), (2, keys), (2, keys)))
    weight = torch.randn(1, 4, 101, 8, generator=g)
    (attention._causal_attention(q, k, v, q_start=q_start, scale=0.3, dropout=0.0) * weight).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = (q64 @ k64.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    allowed = torch.arange(keys).unsqueeze(0) <= torch.arange(q_start, keys).unsqueeze(1)
    ref = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v64.repeat_interleave(2, 1)
    (ref * weight.double()).sum().backward()
    for ours, theirs in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert (ours.double() - theirs).abs().max() < 1e-5


@pytest.mark.distributed
def test_packed_cp_attention_matches_transformers(tiny_hf_dirs):
    hf_dir = tiny_hf_dirs["qwen3"]
    per_rank = run_distributed(_worker, 2, hf_dir)
    for cp in (1, 2):
        sequences = per_rank[0][cp]["sequences"]
        ref_logits, ref_grad = _reference(hf_dir, sequences, per_rank[0][cp]["logits"].shape[1])
        cu = per_rank[0][cp]["cu_padded"].tolist()
        ranks = [r[cp] for r in (per_rank if cp == 2 else per_rank[:1])]
        checked = 0
        for result in ranks:
            for row, position in enumerate(result["positions"].tolist()):
                seq = max(i for i in range(len(LENGTHS)) if cu[i] <= position)
                offset = position - cu[seq]
                if offset >= LENGTHS[seq]:
                    continue  # padding
                ref = ref_logits[seq][offset]
                err = ((result["logits"][row] - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-4, f"CP={cp}: sequence {seq} token {offset}: relative logit error {err:.2e}"
                checked += 1
        assert checked == sum(LENGTHS)
        for result in ranks:
            err = ((result["grad"] - ref_grad).abs().max() / ref_grad.abs().max()).item()
            assert err < 1e-4, f"CP={cp}: embedding gradient relative error {err:.2e}"
