"""`--help` of the commands: the jobs list their main config keys with the schema's defaults and
the first sentence of each field's docstring; no description is cut mid-sentence."""

import importlib

import pytest

from k15_megatron.config.schema import ExperimentConfig
from k15_megatron.jobs.help_text import COMMON_KEYS, expand_keys


def _help(module: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("job, own_key, own_default", [
    ("sft", "optim.train_iters", 100), ("rl", "rl.prompts_per_iteration", 64), ("eval", "eval.num_samples", 1)])
def test_job_help_lists_main_keys_with_schema_defaults_and_docs(job, own_key, own_default, capsys):
    module = importlib.import_module(f"k15_megatron.jobs.{job}")
    text = _help(module.__name__, capsys)
    assert f"k15 {job} CONFIG [overrides]" in text and "--verbose" in text
    expected = [("data.eval_path" if job == "eval" else "data.train_path", None), ("model.init_from", None),
                ("model.hf_path", None), ("parallel.tensor", 1), ("parallel.pipeline", 1), ("run_dir", "runs/${name}"),
                (own_key, own_default)]
    for key, default in expected:
        assert f"  {key} (default: {default!r})" in text, key
    assert "Training JSONL file" in text or "Held-out prompt JSONL file" in text  # the field docs
    for key in expand_keys(ExperimentConfig, [*COMMON_KEYS, *module.HELP_KEYS]):  # every listed key is shown
        assert f"  {key} (default: " in text, key


def test_export_help_is_whole(capsys):
    text = _help("k15_megatron.jobs.export", capsys)
    flat = " ".join(text.split())
    assert "a Hugging Face folder from any k15 checkpoint (converted, run checkpoint, or a run's save directory)." in flat
    assert "--overwrite" in text and "every other file in it is kept" in flat


def test_a_key_s_first_sentence_is_not_cut_at_an_abbreviation():
    from k15_megatron.jobs.help_text import _first_sentence

    text = "KL strength of the DPO loss (Rafailov et al. 2023, eq. 7; > 0): the reward. More."
    assert _first_sentence(text) == "KL strength of the DPO loss (Rafailov et al. 2023, eq. 7; > 0): the reward."
    assert _first_sentence("Use e.g. this. Next.") == "Use e.g. this."
