"""The run's tokenizer: a named folder without tokenizer files, or a tokenizer with more tokens
than the model's vocabulary, is an error naming the folder (never the character tokenizer)."""

import os
import shutil

import pytest
from tooling import REPO_ROOT, run_tool

from k15_megatron.config import ModelConfig
from k15_megatron.models.tokenizer import TOKENIZER_FILES, load_tokenizer, tokenizer_folder


def _without_tokenizer(src, dst):
    shutil.copytree(src, dst)
    removed = [n for n in os.listdir(dst) if n.startswith(("tokenizer", "special_tokens", "chat_template"))
               or n in ("vocab.json", "merges.txt")]
    for name in removed:
        os.remove(os.path.join(dst, name))
    assert not any(os.path.exists(os.path.join(dst, n)) for n in TOKENIZER_FILES)
    return str(dst)


def test_model_folder_without_tokenizer_is_an_error_naming_it(tiny_hf_dirs, tmp_path):
    folder = _without_tokenizer(tiny_hf_dirs["qwen2"], tmp_path / "no_tok")
    with pytest.raises(ValueError, match="no tokenizer files") as err:
        load_tokenizer(ModelConfig(hf_path=folder), vocab_size=128)
    assert folder in str(err.value) and "model.hf_path" in str(err.value)


def test_checkpoint_without_tokenizer_is_an_error_naming_its_assets(tmp_path):
    (tmp_path / "ckpt" / "hf_assets").mkdir(parents=True)
    with pytest.raises(ValueError, match="no tokenizer files") as err:
        tokenizer_folder(ModelConfig(init_from=str(tmp_path / "ckpt")))
    assert str(tmp_path / "ckpt" / "hf_assets") in str(err.value) and "model.init_from" in str(err.value)


def test_tokenizer_larger_than_the_model_vocabulary_is_an_error(tiny_hf_dirs):
    folder = tiny_hf_dirs["qwen2"]
    tok = load_tokenizer(ModelConfig(hf_path=folder), vocab_size=1000)
    with pytest.raises(ValueError, match="model.vocab_size") as err:
        load_tokenizer(ModelConfig(hf_path=folder), vocab_size=len(tok) - 1)
    assert folder in str(err.value)


def test_checkpoint_assets_are_found_and_no_folder_means_the_character_tokenizer(tiny_hf_dirs, tmp_path):
    shutil.copytree(tiny_hf_dirs["qwen3"], tmp_path / "iter_0000005" / "hf_assets")
    cfg = ModelConfig(init_from=str(tmp_path / "checkpoints"))  # a save dir: resolved by the caller
    assert tokenizer_folder(cfg, init_checkpoint=str(tmp_path / "iter_0000005")) == \
        str(tmp_path / "iter_0000005" / "hf_assets")
    assert tokenizer_folder(ModelConfig()) is None
    assert len(load_tokenizer(ModelConfig(), vocab_size=128)) <= 128


def test_a_checkpoint_s_own_tokenizer_and_template_win_over_the_model_folder(tiny_hf_dirs, tmp_path):
    """An SFT run saved its tokenizer with the template it used; the RL stage that starts from
    it (model.init_from) and names the Hugging Face folder (model.hf_path) keeps that template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dirs["qwen2"])
    tok.chat_template = "Q: {{ messages[0]['content'] }} A:"
    tok.save_pretrained(tmp_path / "iter_0000003" / "hf_assets")
    cfg = ModelConfig(hf_path=tiny_hf_dirs["qwen2"], init_from=str(tmp_path / "iter_0000003"))
    assert tokenizer_folder(cfg) == str(tmp_path / "iter_0000003" / "hf_assets")
    assert load_tokenizer(cfg, vocab_size=1000).chat_template == "Q: {{ messages[0]['content'] }} A:"
    shutil.rmtree(tmp_path / "iter_0000003" / "hf_assets")  # a checkpoint without one: the model's
    (tmp_path / "iter_0000003" / "hf_assets").mkdir()
    assert tokenizer_folder(cfg) == tiny_hf_dirs["qwen2"]


def test_k15_eval_on_a_model_folder_without_tokenizer_stops_before_any_work(tiny_hf_dirs, tmp_path):
    folder = _without_tokenizer(tiny_hf_dirs["qwen2"], tmp_path / "no_tok")
    (tmp_path / "eval.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    proc = run_tool("-m", "k15_megatron.cli", "eval", os.path.join(REPO_ROOT, "examples", "tiny.yaml"),
                    "model.family=null", "model.num_layers=null", "model.hidden_size=null",
                    "model.ffn_hidden_size=null", "model.num_attention_heads=null",
                    "model.num_query_groups=null", "model.vocab_size=null",
                    "model.max_position_embeddings=null", "model.norm_epsilon=null",
                    f"model.hf_path={folder}", f"data.eval_path={tmp_path / 'eval.jsonl'}",
                    f"run_dir={tmp_path / 'run'}", "parallel.world_size=1", timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no tokenizer files" in proc.stderr and folder in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "config.yaml")  # nothing was started or written
