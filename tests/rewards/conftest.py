"""Shared fixtures of the reward tests: a real tiny vLLM judge engine and a leftover-process probe.

Why the tiny tokenizer is byte-level BPE and not word-level: transformers 5 forces
``Qwen2Tokenizer`` on every ``model_type: qwen2`` folder (it lists qwen2 among models with an
"incorrect hub tokenizer class"), which rebuilds the pre-tokenizer and decoder around whatever
vocabulary it finds, so a word-level vocabulary loads broken (the prompt encodes to nothing).
A Qwen2Tokenizer built from the 256 byte-level symbols plus three specials loads the same in
transformers and vLLM and still has only a few hundred tokens.
"""

from __future__ import annotations

import os

import pytest

from k15_megatron.config.rewards import CodeRewardConfig

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_judge(path: str) -> str:
    """Random Qwen2 (hidden 64, 2 layers, 2 heads of dim 32) plus a ~260-token tokenizer."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token=specials[0],
                               pad_token=specials[0], unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    eos = vocab[specials[0]]
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def judge_llm(tmp_path_factory):
    """A real in-process vLLM engine on the tiny random judge model (emits garbage text)."""
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    vllm = pytest.importorskip("vllm")
    path = build_tiny_judge(str(tmp_path_factory.mktemp("tiny_judge")))
    llm = vllm.LLM(path, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    yield llm
    del llm


def sandbox_uid_processes(cfg: CodeRewardConfig | None = None) -> list[tuple[int, int]]:
    """(pid, uid) of every live process whose real uid is in the sandbox uid range."""
    cfg = cfg or CodeRewardConfig()
    low, high = cfg.sandbox_uid_base, cfg.sandbox_uid_base + cfg.num_sandbox_uids
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as handle:
                for line in handle:
                    if line.startswith("Uid:"):
                        uid = int(line.split()[1])
                        if low <= uid < high:
                            found.append((int(entry), uid))
                        break
        except OSError:
            continue  # exited while we looked
    return found


@pytest.fixture
def sandbox_processes():
    """The `sandbox_uid_processes` probe; also asserts after the test that none is alive."""
    yield sandbox_uid_processes
    assert sandbox_uid_processes() == []
