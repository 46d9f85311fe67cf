"""The character tokenizer of the tiny models round-trips text in every family's folder.

transformers picks the tokenizer class from the model type (a qwen2 folder loads as
Qwen2Tokenizer, with byte-level pre-tokenization), so the check loads each saved folder the way
transformers and vLLM do.
"""

from transformers import AutoTokenizer

from k15_megatron.models.tiny import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer

TEXT = "Compute: 37+48-19 = ?\nStep 1: 37+48=85.\n\\boxed{66} (a b)"


def test_one_token_per_character_and_exact_round_trip():
    tok = build_char_tokenizer()
    assert len(tok) == len(SPECIAL_TOKENS) + len(set(CHARACTERS))
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT


def test_saved_folders_round_trip_in_transformers(tiny_hf_dirs):
    reference = build_char_tokenizer().encode(TEXT)
    for family, folder in tiny_hf_dirs.items():
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok.encode(TEXT)
        assert ids == reference, f"{family}: {type(tok).__name__} tokenizes differently"
        assert tok.decode(ids) == TEXT
        assert tok.eos_token_id == 2 and tok.pad_token_id == 0
        chat = tok.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False,
                                       add_generation_prompt=True)
        assert chat.endswith("<|im_start|>assistant\n")
