"""Measures the peak memory of Megatron GPTModel forward+backward passes on CPU (run as a script
by test_plan_activations.py, in a fresh process with glibc's mmap threshold at 64 KiB).

For each case (family, recompute, loss path) and sequence length: the model is built by the project's
builders (fp32, TP=PP=CP=1, local layer spec), DDP-wrapped (its gradient buffer exists before
the measurement), warmed up once; then the kernel's peak RSS is reset (``5`` to
/proc/self/clear_refs), one forward (Megatron's labels path, or the RL path's hidden states and
chunked log-prob head) and backward runs, and peak extra = VmHWM - RSS before. Prints one JSON line per measurement.
"""

import json
import os
import sys

CASES = {
    "qwen2": dict(family="qwen2", num_layers=2, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                  num_query_groups=2, kv_channels=64),
    "qwen3": dict(family="qwen3", num_layers=2, hidden_size=192, ffn_hidden_size=512, num_attention_heads=6,
                  num_query_groups=2, kv_channels=32),
    "qwen3_moe": dict(family="qwen3_moe", num_layers=2, hidden_size=192, ffn_hidden_size=512, num_attention_heads=6,
                      num_query_groups=2, kv_channels=32, num_moe_experts=8, moe_router_topk=2,
                      moe_ffn_hidden_size=256, moe_aux_loss_coeff=0.001),
}
VOCAB = 128
RL_VOCAB = 8192
"""The vocabulary of the ``rl`` loss cases: large enough for the log-prob head to matter."""
RL_CHUNK = 2048
"""rl.logprob_chunk_tokens of the ``rl`` loss cases."""


def measure(name: str, recompute: str, loss: str, lengths):
    """``loss``: labels (Megatron's cross entropy on the logits) | rl (the RL path: hidden
    states and the chunked log-prob head, train/logprobs.py)."""
    import torch

    from k15_megatron.config import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model
    from k15_megatron.parallel.device import compute_device, host_peak_rss_extra
    from k15_megatron.train.logprobs import hidden_state_output
    from k15_megatron.train.optimizer import build_training_objects

    vocab = RL_VOCAB if loss == "rl" else VOCAB
    parallel, precision = ParallelConfig(recompute=recompute), PrecisionConfig(dtype="fp32")
    arch = resolve_model_arch(ModelConfig(vocab_size=vocab, max_position_embeddings=max(lengths),
                                          norm_epsilon=1e-6, rope_theta=1e6, tie_word_embeddings=False,
                                          **CASES[name]))
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=precision, padded_vocab=vocab)
    chunks, _, _ = build_training_objects(model, optim_cfg=OptimConfig(lr=1e-3, clip_grad=0.0),
                                          precision_cfg=precision, num_steps=1)
    num_params = sum(p.numel() for p in model.parameters())

    def step(s: int) -> int:
        ids = torch.randint(0, vocab, (1, s)).to(compute_device())
        positions = torch.arange(s).unsqueeze(0).to(compute_device())
        chunks[0].zero_grad_buffer()

        def forward_backward():
            if loss == "rl":
                with hidden_state_output(chunks) as head:
                    hidden = chunks[0](ids, positions, None)
                    head.token_logprobs(hidden, ids, vocab_size=vocab, chunk_size=RL_CHUNK).sum().backward()
            else:
                chunks[0](ids, positions, None, labels=ids).sum().backward()

        return host_peak_rss_extra(forward_backward)

    step(max(lengths) // 4)  # warm-up: kernels, caches and rope tables of this size
    for s in lengths:
        print(json.dumps({"case": name, "recompute": recompute, "loss": loss, "tokens": s, "peak_extra": step(s),
                          "num_params": num_params}), flush=True)


def main():
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.config import ParallelConfig

    initialize(ParallelConfig(), seed=0)
    for spec in sys.argv[1:]:  # family:recompute:loss@length,length,...
        case, _, lengths = spec.partition("@")
        name, recompute, loss = case.split(":")
        measure(name, recompute, loss, [int(x) for x in lengths.split(",")])


if __name__ == "__main__":
    os.environ.setdefault("RANK", "0")
    main()
