"""How prompts and responses become token ids, the same way in SFT, RL rollouts and evaluation,
and which chat template does it.

A prompt is the user turn of the chat template (with the assistant header appended, so
generation starts the answer). A response is its own tokens followed by the end-of-sequence
token, the one thing the model must learn to stop with.

The template (``data.chat_template``, :func:`choose_chat_template`): null = the tokenizer's own;
a tokenizer without one gets :data:`DEFAULT_CHAT_TEMPLATE` (plain ``User: ...`` /
``Assistant: `` lines that any tokenizer encodes) and the pre-start check prints a one-line
warning. ``default`` asks for that template explicitly (no warning), ``raw`` for the bare
prompt text with no separator (a base model's own format), and a path to a ``.jinja`` file for
any other template. The choice is stored on the tokenizer (``tokenizer.chat_template``), so
every job and the rollout engine format prompts through the one function below.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
"""The built-in template: a user turn ``p`` ready for the reply is ``"User: p\\n\\nAssistant: "``."""
RAW_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
"""``data.chat_template=raw``: the prompt text alone (the ids of ``tokenizer.encode(prompt)``)."""
NAMED_TEMPLATES = {"default": DEFAULT_CHAT_TEMPLATE, "raw": RAW_CHAT_TEMPLATE}


def choose_chat_template(tokenizer, choice: Optional[str]) -> Tuple[str, Optional[str]]:
    """``(template, warning)`` for ``data.chat_template=choice`` (see the module docstring);
    ``warning`` is one line when the tokenizer has no template of its own and none was chosen,
    else None.

    Raises:
        ValueError naming ``data.chat_template`` when ``choice`` is neither null, a named
        template nor a readable file.
    """
    if choice is None:
        own = getattr(tokenizer, "chat_template", None)
        if own:
            return own, None
        source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        return DEFAULT_CHAT_TEMPLATE, (
            f"the tokenizer of {source} has no chat template; prompts use the built-in default "
            "('User: <prompt>\\n\\nAssistant: '); set data.chat_template to a .jinja file for "
            "another one, or to 'default' to silence this warning")
    if choice in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[choice], None
    if not os.path.isfile(choice):
        raise ValueError(f"data.chat_template={choice!r} is neither null, "
                         f"{' nor '.join(repr(n) for n in NAMED_TEMPLATES)} nor an existing "
                         "template file (a Jinja chat template, e.g. chat_template.jinja)")
    with open(choice, encoding="utf-8") as f:
        return f.read(), None


def use_chat_template(tokenizer, choice: Optional[str]) -> Optional[str]:
    """Store the chosen template on ``tokenizer``; returns :func:`choose_chat_template`'s warning."""
    template, warning = choose_chat_template(tokenizer, choice)
    tokenizer.chat_template = template
    return warning


def prompt_token_ids(tokenizer, prompt: str) -> List[int]:
    """Token ids of ``prompt`` as a user turn ready for the assistant's reply, with the
    tokenizer's chat template (:data:`DEFAULT_CHAT_TEMPLATE` when it has none)."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                        tokenize=True, add_generation_prompt=True)
    # transformers 5 returns a BatchEncoding-like mapping here, older versions a list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def response_token_ids(tokenizer, response: str) -> List[int]:
    """Token ids of ``response`` followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token: responses could never end")
    return tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
