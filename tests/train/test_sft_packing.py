"""SFT packing: rows of examples, and the packed (THD) micro-batch that gives every example
exactly the loss it has alone (Megatron, gloo)."""

import pytest
import torch
from distributed import run_distributed

from k15_megatron.data.packing import pack_examples, row_examples


def test_packing_layout_and_loss_mask():
    rows = pack_examples([([1, 2], [3, 4, 9]), ([5], [6, 9]), ([7, 7, 7], [8, 9])], seq_length=8, pad_id=0)
    assert len(rows) == 2
    first = rows[0]
    assert first.input_ids == [1, 2, 3, 4, 9, 5, 6, 9]
    assert first.position_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    assert first.document_ids == [0, 0, 0, 0, 0, 1, 1, 1]
    # loss on labels that are response tokens: 3, 4, 9 (labels of positions 1, 2, 3) and 6, 9
    assert first.loss_mask == [0, 1, 1, 1, 0, 1, 1, 0]
    assert rows[1].document_ids == [0, 0, 0, 0, 0, -1, -1, -1]
    with pytest.raises(ValueError, match="example 0 has 9 tokens"):
        pack_examples([([1] * 5, [2] * 4)], seq_length=8, pad_id=0)


def test_row_examples_drop_padding_and_keep_fields():
    (row,) = pack_examples([([1, 2], [3, 9]), ([5], [6, 7, 9])], seq_length=12, pad_id=0)
    first, second = row_examples(row)
    assert first["input_ids"].tolist() == [1, 2, 3, 9] and first["labels"].tolist() == [2, 3, 9, 0]
    assert first["loss_mask"].tolist() == [0, 1, 1, 0]
    assert second["input_ids"].tolist() == [5, 6, 7, 9] and second["loss_mask"].tolist() == [1, 1, 1, 0]
    assert second["loss_mask"].dtype == torch.float32 and len(row.input_ids) == 12


def _packed_vs_alone(rank, world_size, hf_dir):
    from k15_megatron.checkpoint.model_weights import load_hf_weights
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.jobs.sft import sft_micro_batches
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.schedule import forward_backward, packing_multiple

    parallel = ParallelConfig()
    initialize(parallel)
    arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
    padded = padded_vocab_size(arch.vocab_size, 128, 1)
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"), padded_vocab=padded)
    load_hf_weights(model, hf_dir, arch, padded)
    model.eval()
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(5, 90, (n,), generator=g).tolist(), torch.randint(5, 90, (m,), generator=g).tolist() + [2])
                for n, m in ((4, 6), (7, 3), (2, 9))]
    (batch,) = sft_micro_batches(pack_examples(examples, seq_length=40, pad_id=0), micro_batch_size=1,
                                 multiple=packing_multiple(model))
    assert batch["cu_seqlens"].tolist() == [0, 11, 22, 34]  # three sequences, none of the row's padding

    def keep(mb, token_loss):
        count = torch.ones((), dtype=torch.int, device=token_loss.device)
        return token_loss.sum(), count, {"loss": token_loss.detach()}

    (out,) = forward_backward([model], [batch], keep, forward_only=True)
    packed = out["loss"][0]
    with torch.no_grad():
        errors = []
        offset = 0
        for prompt, response in examples:
            tokens = torch.tensor([prompt + response])
            alone = model(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).unsqueeze(0), None, labels=tokens[:, 1:])[0]
            n = tokens.shape[1] - 1
            errors.append((packed[offset:offset + n] - alone).abs().max().item())
            offset += n + 1
    return max(errors)


@pytest.mark.distributed
def test_packed_row_equals_examples_alone(tiny_hf_dirs):
    (err,) = run_distributed(_packed_vs_alone, 1, tiny_hf_dirs["qwen3"])
    assert err < 1e-5, f"packed per-token loss differs from the example alone by {err:.2e}"
