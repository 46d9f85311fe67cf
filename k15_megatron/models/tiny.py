"""Tiny Hugging Face models and a character tokenizer, built from configs (no hub access).

Used by the built-in tiny default job and by the tests: ``save_tiny_hf_model(out_dir, "qwen2")``
writes a random-weight model (safetensors + config.json) and a tokenizer folder that transformers
and vLLM load unchanged. Sizes respect vLLM's CPU attention (head_dim 32 or 64, not 16) and
Megatron's TP=2 (heads and query groups divisible by 2).
"""

from __future__ import annotations

import json
import os
import string

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>")
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"

TINY_SIZES = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written
    in): printable Latin-1 bytes map to themselves, the others to code points from 256 up."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_char_tokenizer():
    """A PreTrainedTokenizerFast with one token per printable ASCII character plus specials.

    Token ids: the specials first (pad=0, bos=1, eos=2, unk=3, chat markers 4-5), then characters.
    It is a byte-level BPE without merges, so every character is one token and
    ``decode(encode(text)) == text`` for ASCII text. Byte-level (not a plain word-level model)
    because transformers loads the tokenizer of a ``qwen2`` folder as ``Qwen2Tokenizer``, which
    imposes byte-level pre-tokenization: a word-level vocabulary would silently lose spaces there.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = _byte_level_alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(alphabet[ord(ch)], len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# Mixture-of-experts tiny models: 4 routed experts (top 2) per layer, the first layer dense.
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, mlp_only_layers=[0],
                router_aux_loss_coef=0.01)

# DeepSeek-V3: multi-latent attention with the latent and rotary widths vLLM's CPU MLA decode kernel
# requires (kv_lora_rank 512 + qk_rope_head_dim 64), 8 routed experts in 2 groups (top 2 from the best
# group), one shared expert, the first layer dense. topk_method / scoring_func are written as the
# published checkpoints have them (vLLM reads them; transformers always computes this routing).
TINY_DEEPSEEK_V3 = dict(
    q_lora_rank=96, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
    moe_intermediate_size=64, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
    topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=0, rope_scaling=None,
    rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6,
)


def _config_for(family: str, tokenizer_size: int, **overrides):
    from transformers import (DeepseekV3Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                              Qwen3MoeConfig)

    sizes = {**TINY_SIZES, **overrides}
    common = dict(vocab_size=tokenizer_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        base = dict(rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        return LlamaConfig(**{**common, **base, **sizes})
    if family == "qwen2":
        base = dict(rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
        return Qwen2Config(**{**common, **base, **sizes})
    if family == "qwen3":
        base = dict(rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-6, head_dim=32)
        return Qwen3Config(**{**common, **base, **sizes})
    if family == "mistral":
        # Mistral-Nemo's shape: an explicit head_dim (32) wider than hidden / heads (16); no sliding window.
        sizes = {**TINY_SIZES, "num_attention_heads": 8, **overrides}
        base = dict(rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-5, head_dim=32,
                    sliding_window=None)
        return MistralConfig(**{**common, **base, **sizes})
    if family == "qwen3_moe":
        base = dict(rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-6, head_dim=32,
                    norm_topk_prob=True, **TINY_MOE)
        return Qwen3MoeConfig(**{**common, **base, **sizes})
    if family == "qwen2_moe":
        base = dict(rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-6, norm_topk_prob=False,
                    shared_expert_intermediate_size=96, **TINY_MOE)
        return Qwen2MoeConfig(**{**common, **base, **sizes})
    if family == "deepseek_v3":
        return DeepseekV3Config(**{**common, **TINY_DEEPSEEK_V3, **{**TINY_SIZES, "num_key_value_heads": 4, **overrides}})
    raise ValueError(f"tiny model family {family!r}: use llama, qwen2, qwen3, mistral, qwen2_moe, qwen3_moe "
                     "or deepseek_v3")


@torch.no_grad()
def _randomise_router_bias(model, std: float) -> None:
    """DeepSeek-V3's expert score-correction biases start at zero in transformers: draw them, so
    that tests see them act on routing."""
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape) * std)


def save_tiny_hf_model(out_dir: str, family: str = "qwen2", *, seed: int = 0, init_std: float = 0.02,
                       max_shard_size: str | None = None, **size_overrides) -> str:
    """Write a random tiny ``family`` model plus the character tokenizer to ``out_dir``.

    ``init_std`` scales the random weights (larger values give peakier, more diverse outputs).
    ``max_shard_size`` (e.g. "200KB") forces sharded safetensors with an index file.
    Returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = build_char_tokenizer()
    config = _config_for(family, len(tokenizer), **size_overrides)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_router_bias(model, init_std)
    os.makedirs(out_dir, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f)
    return out_dir


def save_hf_model_from_arch(arch, out_dir: str, *, seed: int = 0, init_std: float = 0.02, tokenizer=None,
                            base_config_dir: str | None = None) -> str:
    """Write a random-weight HF model of architecture ``arch`` plus a tokenizer (default: the
    character tokenizer). ``base_config_dir``'s config.json supplies the non-architecture keys.

    ``arch.vocab_size`` must hold the tokenizer (>= its size); extra rows are simply never used.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from k15_megatron.config.hf_config import hf_config_dict

    tokenizer = tokenizer or build_char_tokenizer()
    if arch.vocab_size < len(tokenizer):
        raise ValueError(f"model.vocab_size={arch.vocab_size} is smaller than the tokenizer "
                         f"({len(tokenizer)} tokens)")
    base = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    if base_config_dir and os.path.exists(os.path.join(base_config_dir, "config.json")):
        with open(os.path.join(base_config_dir, "config.json")) as f:
            base = json.load(f)
    values = hf_config_dict(arch, base)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
