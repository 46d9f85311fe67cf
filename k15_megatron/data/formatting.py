"""How prompts and responses become token ids, the same way in SFT, RL rollouts and evaluation.

A prompt is the user turn of the tokenizer's chat template (with the assistant header appended,
so generation starts the answer); a tokenizer without a chat template gets the raw text. A
response is its own tokens followed by the end-of-sequence token, the one thing the model must
learn to stop with.
"""

from __future__ import annotations

from typing import List


def prompt_token_ids(tokenizer, prompt: str) -> List[int]:
    """Token ids of ``prompt`` as a user turn ready for the assistant's reply."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)
        # transformers 5 returns a BatchEncoding-like mapping here, older versions a list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode(prompt, add_special_tokens=False)


def response_token_ids(tokenizer, response: str) -> List[int]:
    """Token ids of ``response`` followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token: responses could never end")
    return tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
