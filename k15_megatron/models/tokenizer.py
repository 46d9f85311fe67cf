"""Which tokenizer a run uses, decided in one place, and the check that it fits the model.

In order: the ``hf_assets`` folder that the k15 checkpoint named by ``model.init_from`` carries
(the tokenizer, and chat template, that checkpoint was trained with); the Hugging Face folder of
``model.hf_path``. A run that names neither (the built-in tiny
default: a model defined entirely in the config) uses the character tokenizer of
:mod:`k15_megatron.models.tiny`. A run that names a folder but finds no tokenizer files there is
an error, never a silent fall-back to the character tokenizer (its ids would mean nothing to
the model); so is a tokenizer with more tokens than the model's vocabulary (``vocab_size`` of
config.json / ``model.vocab_size``), whose extra ids would index past the embedding.

``k15 sft|rl|eval`` load the tokenizer here once before any process starts
(:mod:`k15_megatron.jobs.preflight`), so both errors come before start-up. Which chat template
formats the prompts is ``data.chat_template`` (:mod:`k15_megatron.data.formatting`).
"""

from __future__ import annotations

import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""A folder holds a tokenizer when it has one of these (what ``save_pretrained`` writes)."""


def tokenizer_folder(model_cfg, *, init_checkpoint: str | None = None) -> str | None:
    """The folder holding the run's tokenizer files, or None for the built-in tokenizer.

    Args:
        model_cfg: the ``model`` section.
        init_checkpoint: the checkpoint folder ``model.init_from`` resolves to (a run's save
            directory resolved to its latest checkpoint); its ``hf_assets`` are searched.

    Raises:
        ValueError naming every folder searched, when the run names one but none holds
        tokenizer files.
    """
    candidates = []
    if model_cfg.init_from:
        assets = os.path.join(init_checkpoint or model_cfg.init_from, "hf_assets")
        candidates.append(("model.init_from", assets))
    if model_cfg.hf_path:
        candidates.append(("model.hf_path", model_cfg.hf_path))
    for _, folder in candidates:
        if any(os.path.exists(os.path.join(folder, name)) for name in TOKENIZER_FILES):
            return folder
    if not candidates:
        return None
    searched = "; ".join(f"{folder} ({key})" for key, folder in candidates)
    raise ValueError(f"no tokenizer files ({' or '.join(TOKENIZER_FILES)}) in {searched}; copy the "
                     "model's tokenizer into the folder (tokenizer.save_pretrained)")


def load_tokenizer(model_cfg, *, vocab_size: int, init_checkpoint: str | None = None):
    """The run's tokenizer (see the module docstring).

    Args:
        vocab_size: the model's vocabulary before padding (``ModelArch.vocab_size``).

    Raises:
        ValueError naming the folder when no tokenizer is found there or when the tokenizer
        has more than ``vocab_size`` tokens.
    """
    folder = tokenizer_folder(model_cfg, init_checkpoint=init_checkpoint)
    if folder is None:
        from k15_megatron.models.tiny import build_char_tokenizer

        tokenizer, source = build_char_tokenizer(), "the built-in character tokenizer"
    else:
        from transformers import AutoTokenizer

        tokenizer, source = AutoTokenizer.from_pretrained(folder), f"the tokenizer of {folder}"
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{source} has {len(tokenizer)} tokens but the model's vocabulary "
                         f"(model.vocab_size) is {vocab_size}: token ids past {vocab_size - 1} "
                         "have no embedding; use the model's own tokenizer")
    return tokenizer
