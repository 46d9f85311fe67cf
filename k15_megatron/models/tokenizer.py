"""Which tokenizer a run uses, decided in one place.

In order: the Hugging Face folder of ``model.hf_path``; the ``hf_assets`` a k15 checkpoint named
by ``model.init_from`` carries; otherwise (the built-in tiny default, a model defined entirely in
the config) the character tokenizer of :mod:`k15_megatron.models.tiny`.
"""

from __future__ import annotations

import os


def tokenizer_folder(model_cfg) -> str | None:
    """The folder holding the run's tokenizer files, or None for the built-in tokenizer."""
    candidates = []
    if model_cfg.hf_path:
        candidates.append(model_cfg.hf_path)
    if model_cfg.init_from:
        candidates.append(os.path.join(model_cfg.init_from, "hf_assets"))
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "tokenizer_config.json")) or \
                os.path.exists(os.path.join(folder, "tokenizer.json")):
            return folder
    return None


def load_tokenizer(model_cfg):
    """The run's tokenizer (see the module docstring)."""
    folder = tokenizer_folder(model_cfg)
    if folder is None:
        from k15_megatron.models.tiny import build_char_tokenizer

        return build_char_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
