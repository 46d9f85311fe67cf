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
import signal
import socket
import subprocess
import sys
import time
import urllib.request

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
                         max_position_embeddings=2048, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


KV_CACHE_BYTES = 64 << 20  # vLLM's CPU default would claim ~40% of the machine's RAM


@pytest.fixture(scope="session")
def tiny_judge_path(tmp_path_factory) -> str:
    """Folder of the tiny random judge model (see `build_tiny_judge`)."""
    return build_tiny_judge(str(tmp_path_factory.mktemp("tiny_judge")))


@pytest.fixture(scope="session")
def judge_llm(vllm_engine):
    """The test session's one vLLM engine (tests/conftest.py) acting as the judge: a real engine
    on a tiny random model, so it emits garbage text."""
    return vllm_engine


@pytest.fixture(scope="session")
def served_judge(tiny_judge_path):
    """A real ``vllm serve`` (OpenAI-compatible server) on the tiny judge, behind an API key.

    Yields ``(base_url, model, api_key)``. Started in its own process group, killed as a group.
    """
    import vllm  # noqa: F401  (installed here: fail loudly if it is broken, never skip)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api_key = "k15-test-key"
    log = open(os.path.join(os.path.dirname(tiny_judge_path), "serve.log"), "w+")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_judge_path,
         "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--host",
         "127.0.0.1", "--port", str(port), "--api-key", api_key,
         "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600  # start-up on a machine loaded by other jobs
        while True:
            request = urllib.request.Request(base_url + "/models",
                                             headers={"Authorization": f"Bearer {api_key}"})
            try:
                with urllib.request.urlopen(request, timeout=2):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail("vllm serve did not come up:\n" + log.read()[-3000:])
            time.sleep(0.5)
        yield base_url, tiny_judge_path, api_key
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        log.close()


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
