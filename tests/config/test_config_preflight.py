"""Data and model checks before any process starts (k15_megatron.jobs.preflight): the lengths
against the model's context (rollout.max_model_len derived from max_position_embeddings), the
tokenizer's vocabulary and chat template, and every data mistake named in one line by
``k15 config show --job`` and by ``k15 sft|rl`` without starting torch.distributed, Megatron or
vLLM."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from tooling import REPO_ROOT, run_tool

from k15_megatron import cli
from k15_megatron.config import ConfigError, load_config
from k15_megatron.data.formatting import (DEFAULT_CHAT_TEMPLATE, choose_chat_template, prompt_token_ids,
                                          use_chat_template)
from k15_megatron.jobs.preflight import pre_start_errors
from k15_megatron.models.tiny import build_char_tokenizer

TINY = os.path.join(REPO_ROOT, "examples", "tiny.yaml")
CONTEXT = 512
START_UP_TEXT = ("torch.distributed", "megatron", "vllm", "torchrun", "Traceback")


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """A Hugging Face folder: config.json of a small Qwen2 (max_position_embeddings=512, no
    weights: the checks read none) and a byte-level BPE tokenizer WITHOUT a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

    folder = tmp_path_factory.mktemp("plain_model")
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["</s>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="</s>")
    assert not tokenizer.chat_template
    tokenizer.save_pretrained(str(folder))

    def write_config(vocab_size):
        Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                    tie_word_embeddings=False).to_json_file(str(folder / "config.json"))

    write_config(1000)  # the tokenizer class (and so its size) follows config.json's model_type
    write_config(len(AutoTokenizer.from_pretrained(str(folder))))
    return str(folder)


def _hf_overrides(folder):
    """tiny.yaml with its architecture taken from ``folder``'s config.json instead."""
    nulls = ["family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
             "num_query_groups", "vocab_size", "max_position_embeddings", "norm_epsilon"]
    return [f"model.{key}=null" for key in nulls] + [f"model.hf_path={folder}", "parallel.world_size=1"]


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_max_model_len_defaults_to_the_model_context_and_a_larger_value_is_refused(plain_model):
    cfg = load_config(TINY, _hf_overrides(plain_model), environ={})
    assert cfg.rollout.max_model_len == CONTEXT
    with pytest.raises(ConfigError) as err:
        load_config(TINY, _hf_overrides(plain_model) + ["rollout.max_model_len=1024"], environ={})
    [line] = err.value.errors
    assert line.startswith("rollout.max_model_len=1024 exceeds the model's context of 512 tokens")
    assert os.path.join(plain_model, "config.json") in line and "at most 512" in line


def test_job_lengths_against_the_context(plain_model, tmp_path):
    train = _write(tmp_path / "t.jsonl", [{"prompt": "1+1", "answer": "2"}])
    sft = _write(tmp_path / "s.jsonl", [{"prompt": "1+1", "response": "2"}])
    cfg = load_config(TINY, _hf_overrides(plain_model) + [f"data.train_path={train}", "data.seq_length=null"],
                      environ={})
    # The defaults come from the model's 512-token context: half of it for the response.
    assert (cfg.rollout.max_model_len, cfg.rollout.max_response_tokens, cfg.data.seq_length) == (512, 256, 512)
    assert pre_start_errors(cfg, job="rl")[0] == []
    # An explicit response cap that cannot fit is named with a valid value.
    cfg = load_config(TINY, _hf_overrides(plain_model) + [f"data.train_path={train}",
                                                          "rollout.max_response_tokens=16384"], environ={})
    errors, _ = pre_start_errors(cfg, job="rl")
    assert errors == ["rollout.max_response_tokens=16384 leaves no room for the prompt in "
                      "rollout.max_model_len=512 (the model's context); set rollout.max_response_tokens "
                      "below 512 minus the longest prompt (e.g. rollout.max_response_tokens=256)"]
    cfg = load_config(TINY, _hf_overrides(plain_model) + [f"data.train_path={sft}", "data.seq_length=1024"],
                      environ={})
    errors, _ = pre_start_errors(cfg, job="sft")
    assert errors == ["data.seq_length=1024 exceeds the model's context of 512 tokens (max_position_embeddings "
                      f"in {plain_model}/config.json); set data.seq_length to at most 512"]


def test_a_tokenizer_without_chat_template_gets_the_default_with_a_warning(plain_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plain_model)
    template, warning = choose_chat_template(tok, None)
    assert template == DEFAULT_CHAT_TEMPLATE and "has no chat template" in warning
    assert "data.chat_template" in warning and "\n" not in warning
    expected = tok.encode("User: 12+3\n\nAssistant: ", add_special_tokens=False)
    assert prompt_token_ids(tok, "12+3") == expected
    assert use_chat_template(tok, "raw") is None and prompt_token_ids(tok, "12+3") == tok.encode("12+3")
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}=")
    assert use_chat_template(tok, str(tmp_path / "t.jinja")) is None
    assert prompt_token_ids(tok, "12+3") == tok.encode("12+3=")
    with pytest.raises(ValueError, match="data.chat_template='nope'"):
        choose_chat_template(tok, "nope")
    # The pre-start check warns once, in one line, naming the key.
    sft = _write(tmp_path / "s.jsonl", [{"prompt": "1+1", "response": "2"}])
    cfg = load_config(TINY, _hf_overrides(plain_model) + [f"data.train_path={sft}"], environ={})
    errors, warnings = pre_start_errors(cfg, job="sft")
    assert errors == [] and len(warnings) == 1 and "has no chat template" in warnings[0]


def test_the_character_tokenizer_keeps_its_own_template_and_token_ids():
    tok = build_char_tokenizer()
    before = tok.apply_chat_template([{"role": "user", "content": "12+3"}], tokenize=True,
                                     add_generation_prompt=True)
    before = list(before["input_ids"] if hasattr(before, "keys") else before)
    assert use_chat_template(tok, None) is None
    assert prompt_token_ids(tok, "12+3") == before
    assert before == tok.encode("<|im_start|>user\n12+3<|im_end|>\n<|im_start|>assistant\n")


def _show(capsys, *args):
    status = cli.main(["config", "show", TINY, *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_config_show_job_names_each_data_mistake_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "1+1", "answer": 2}, {"prompt": "2+2"}, "{oops"])
    empty = _write(tmp_path / "empty.jsonl", [])
    sft = _write(tmp_path / "s.jsonl", [{"prompt": "1+1", "response": "2"}, {"prompt": "1+1", "response": "y" * 300}])
    rollout = ["rollout.max_response_tokens=64"]
    status, out, err = _show(capsys, "--job", "rl", f"data.train_path={prompts}",
                             f"data.eval_path={tmp_path / 'missing.jsonl'}", "model.vocab_size=64", *rollout)
    assert status == 2 and out == ""
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert problems == [
        "  - the built-in character tokenizer has 102 tokens but the model's vocabulary (model.vocab_size) is 64: "
        "token ids past 63 have no embedding; use the model's own tokenizer",
        f"  - data.train_path: {prompts}:2: record has no 'answer' key (keys: ['prompt'])",
        f"  - data.train_path: {prompts}:3: not valid JSON (Expecting property name enclosed in double quotes)",
        f"  - data.eval_path: {tmp_path / 'missing.jsonl'}: no such file"]
    status, _, err = _show(capsys, "--job", "sft", f"data.train_path={empty}")
    assert status == 2 and f"data.train_path: {empty}: the file holds no records" in err
    # Too long: dropped with a one-line count, or refused naming file:line.
    status, out, err = _show(capsys, "--job", "sft", f"data.train_path={sft}")
    assert status == 0 and yaml.safe_load(out)["data"]["too_long"] == "filter"
    assert err == (f"warning: data.train_path: {sft}: dropped 1 of 2 examples longer than data.seq_length=256 "
                   "tokens (data.too_long=filter); lines 2\n")
    status, _, err = _show(capsys, "--job", "sft", f"data.train_path={sft}", "data.too_long=error")
    assert status == 2 and f"  - data.train_path: {sft}:2: example has 3" in err
    good = _write(tmp_path / "good.jsonl", [{"prompt": "1+1", "answer": 2}])
    status, _, err = _show(capsys, "--job", "rl", f"data.train_path={good}", "data.too_long=error", *rollout)
    assert status == 0 and err == ""
    long = _write(tmp_path / "long.jsonl", [{"prompt": "1+1", "answer": "2"}, {"prompt": "x" * 500, "answer": "1"}])
    status, _, err = _show(capsys, "--job", "eval", f"data.eval_path={long}", "data.too_long=error", *rollout)
    assert status == 2 and f"  - data.eval_path: {long}:2: prompt has 5" in err
    # Without --job nothing but the config is read (fast, no tokenizer): the same recipe shows.
    assert _show(capsys, f"data.train_path={tmp_path / 'missing.jsonl'}")[0] == 0


def _assert_refused_before_start_up(proc, run_dir, expected):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: invalid configuration"), proc.stderr[-3000:]
    problems = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert problems == expected, proc.stderr
    lowered = (proc.stdout + proc.stderr).lower()
    assert not [word for word in START_UP_TEXT if word.lower() in lowered], proc.stderr
    assert not os.path.exists(run_dir)  # nothing was started or written


def test_k15_rl_and_sft_name_the_mistakes_before_any_process_starts(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "1+1", "answer": 2}, {"prompt": "2+2"}, "{oops"])
    run_dir = str(tmp_path / "run")
    common = [f"run_dir={run_dir}", "parallel.world_size=2", "model.vocab_size=64"]
    proc = run_tool("-m", "k15_megatron.cli", "rl", TINY, *common, f"data.train_path={prompts}",
                    f"data.eval_path={tmp_path / 'missing.jsonl'}", "rl.prompts_per_iteration=16",
                    "rollout.max_response_tokens=16384", timeout=240)
    _assert_refused_before_start_up(proc, run_dir, [
        "  - rollout.max_response_tokens=16384 leaves no room for the prompt in rollout.max_model_len=512 (the "
        "model's context); set rollout.max_response_tokens below 512 minus the longest prompt (e.g. "
        "rollout.max_response_tokens=256)",
        "  - the built-in character tokenizer has 102 tokens but the model's vocabulary (model.vocab_size) is 64: "
        "token ids past 63 have no embedding; use the model's own tokenizer",
        f"  - data.train_path: {prompts}:2: record has no 'answer' key (keys: ['prompt'])",
        f"  - data.train_path: {prompts}:3: not valid JSON (Expecting property name enclosed in double quotes)",
        f"  - data.eval_path: {tmp_path / 'missing.jsonl'}: no such file"])
    empty = _write(tmp_path / "empty.jsonl", [])
    proc = run_tool("-m", "k15_megatron.cli", "sft", TINY, *common, f"data.train_path={empty}", timeout=240)
    _assert_refused_before_start_up(proc, run_dir, [
        "  - the built-in character tokenizer has 102 tokens but the model's vocabulary (model.vocab_size) is 64: "
        "token ids past 63 have no embedding; use the model's own tokenizer",
        f"  - data.train_path: {empty}: the file holds no records (one JSON object per line expected)"])


def test_ranks_started_by_a_checked_launch_skip_the_second_pass(tmp_path, monkeypatch):
    """The launching process records the passed check (job and config digest) in the
    environment torchrun's ranks inherit; another config or job is checked again."""
    from k15_megatron.jobs.preflight import CHECKED_ENV, job_checks

    monkeypatch.setenv(CHECKED_ENV, "none")  # restored (removed) after the test
    path = tmp_path / "s.jsonl"
    _write(path, [{"prompt": "1+1", "response": "2"}])
    cfg = load_config(TINY, [f"data.train_path={path}", "parallel.world_size=1"], environ={})
    assert job_checks("sft")(cfg) == [] and os.environ[CHECKED_ENV].startswith("sft:")
    path.write_text("")  # what a rank would find if it checked again
    assert job_checks("sft")(cfg) == []
    other = load_config(TINY, [f"data.train_path={path}", "parallel.world_size=1", "seed=7"], environ={})
    [error] = job_checks("sft")(other)
    assert "the file holds no records" in error


def test_config_show_without_a_job_imports_neither_torch_nor_transformers():
    proc = run_tool("-c", "import io, sys, contextlib; from k15_megatron import cli\n"
                          "with contextlib.redirect_stdout(io.StringIO()):\n"
                          f"    assert cli.main(['config', 'show', {TINY!r}, 'parallel.world_size=1']) == 0\n"
                          "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))", timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


def test_training_in_bf16_without_a_gpu_is_refused_before_start_up(tmp_path):
    """Megatron's mixed-precision optimizer takes only CUDA tensors: on this machine a bf16 `k15 sft`
    or `k15 rl` would fail after start-up with a traceback; it is refused up front, and evaluation
    (no optimizer) is not."""
    import torch

    sft = _write(tmp_path / "s.jsonl", [{"prompt": "1+1", "response": "2"}])
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "1+1", "answer": "2"}])
    base = ["precision.dtype=bf16", f"data.train_path={sft}", f"data.eval_path={prompts}", "parallel.world_size=1"]
    expected = [] if torch.cuda.is_available() else [
        "precision.dtype=bf16: training in bf16 needs a GPU (Megatron's mixed-precision optimizer takes CUDA "
        "tensors) and this machine has none; set precision.dtype=fp32"]
    assert pre_start_errors(load_config(TINY, base, environ={}), job="sft")[0] == expected
    rl = load_config(TINY, base + [f"data.train_path={prompts}", "rollout.max_response_tokens=64"], environ={})
    assert pre_start_errors(rl, job="rl")[0] == expected
    assert pre_start_errors(rl, job="eval")[0] == []


def test_sequence_parallelism_without_transformer_engine_is_refused_where_the_job_runs(tmp_path):
    """Megatron-Core's local norm asserts under sequence parallelism at model build: a job on a
    machine without TE is refused up front; `k15 config show` (no job) still shows the config."""
    from k15_megatron.config.env import have_transformer_engine

    sft = _write(tmp_path / "s.jsonl", [{"prompt": "1+1", "response": "2"}])
    cfg = load_config(TINY, [f"data.train_path={sft}", "parallel.world_size=2", "parallel.tensor=2",
                             "parallel.sequence_parallel=true"], environ={})  # validation accepts it
    errors = pre_start_errors(cfg, job="sft")[0]
    expected = [] if have_transformer_engine() else [
        "parallel.sequence_parallel=true needs Transformer Engine's layer spec (Megatron-Core's local norm refuses "
        "sequence parallelism) and transformer_engine is not importable on this machine; run where it is "
        "installed or set parallel.sequence_parallel=false"]
    assert errors == expected


@pytest.mark.parametrize("choice", ["default", "raw"])
def test_the_chosen_template_is_saved_with_the_run_assets(plain_model, tmp_path, choice):
    """The next stage (model.init_from) and k15 export read the run's hf_assets: the template the
    run chose must be there, not the model folder's (which has none)."""
    import types

    from transformers import AutoTokenizer

    from k15_megatron.config import resolve_model_arch
    from k15_megatron.data.formatting import NAMED_TEMPLATES, use_chat_template
    from k15_megatron.train.setup import write_run_assets

    cfg = load_config(TINY, _hf_overrides(plain_model) + [f"run_dir={tmp_path}"], environ={})
    tokenizer = AutoTokenizer.from_pretrained(plain_model)
    use_chat_template(tokenizer, choice)
    trainer = types.SimpleNamespace(cfg=cfg, is_logging_rank=True, tokenizer_dir=plain_model, tokenizer=tokenizer,
                                    arch=resolve_model_arch(cfg.model))
    saved = AutoTokenizer.from_pretrained(write_run_assets(trainer))
    assert saved.chat_template == NAMED_TEMPLATES[choice]
    assert prompt_token_ids(saved, "12+3") == prompt_token_ids(tokenizer, "12+3")


def test_eval_replaces_its_own_results_but_never_a_user_s_file(tmp_path):
    from k15_megatron.jobs.eval_output import samples_file, write_json

    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "1+1", "answer": "2"}])
    output = tmp_path / "mine.json"

    def errors():
        cfg = load_config(TINY, [f"data.eval_path={prompts}", f"eval.output={output}", "parallel.world_size=1",
                                 "rollout.max_response_tokens=64"], environ={})
        return pre_start_errors(cfg, job="eval")[0]

    assert errors() == []  # new
    output.write_text('{"my": "notes"}')
    assert errors() == [f"eval.output={output}: {output} exists and is not an earlier k15 eval result; choose "
                        "another eval.output (k15 eval replaces only its own results)"]
    write_json(str(output), {"weights": "w", "eval_path": prompts, "per_prompt": [1.0]})
    assert errors() == []  # an earlier result
    (tmp_path / "mine_samples.jsonl").write_text("my notes\n")
    [error] = errors()
    assert samples_file(str(output)) in error and output.read_text().startswith("{")


def test_moe_training_under_tensor_parallelism_needs_sequence_parallelism(tmp_path, tiny_moe_hf_dirs):
    """Megatron-Core's MoE layer raises at the first training forward under TP without SP: the
    training jobs say so before start-up; evaluation (forward only) and EP with TP=1 pass. On
    CPU, rollouts of an MoE model need one vLLM engine over all ranks."""
    path = _write(tmp_path / "s.jsonl", [{"prompt": "1+1", "response": "2"}])
    moe = _hf_overrides(tiny_moe_hf_dirs["qwen3_moe"]) + [f"data.train_path={path}",
           f"data.eval_path={_write(tmp_path / 'e.jsonl', [{'prompt': '1+1', 'answer': '2'}])}"]
    tp2 = load_config(TINY, moe + ["parallel.world_size=2", "parallel.tensor=2"], environ={})
    errors, _ = pre_start_errors(tp2, job="sft")
    assert [e for e in errors if "mixture-of-experts" in e] == [
        "parallel.tensor=2 with a mixture-of-experts model (qwen3_moe) trains only with "
        "parallel.sequence_parallel=true (Megatron-Core's MoE layer refuses tensor parallelism without it; "
        "sequence parallelism needs Transformer Engine); or split the experts with parallel.expert and keep "
        "parallel.tensor=1"]
    assert not [e for e in pre_start_errors(tp2, job="eval")[0] if "trains only with" in e]
    ep2 = load_config(TINY, moe + ["parallel.world_size=2", "parallel.expert=2"], environ={})
    assert not [e for e in pre_start_errors(ep2, job="sft")[0] if "mixture-of-experts" in e]
    budget = load_config(TINY, moe + ["parallel.world_size=2", "parallel.expert=2", "data.micro_batch_tokens=128"],
                         environ={})
    assert [w for w in pre_start_errors(budget, job="sft")[1] if "micro_batch_tokens" in w] == [
        "data.micro_batch_tokens=128 is not used by k15 sft (its micro-batches are data.micro_batch_size packed "
        "rows of data.seq_length tokens); it sets the token budget of k15 rl's update and log-prob recompute"]
    # Two vLLM replicas of an MoE model exchange tokens in every expert layer; vLLM's CPU build
    # cannot (NotImplementedError once generation starts): refused for the jobs that generate.
    for job in ("rl", "eval"):
        assert [e for e in pre_start_errors(ep2, job=job)[0] if "mixture-of-experts" in e] == [
            "rollout.tensor_parallel_size=1 runs 2 vLLM replicas of a mixture-of-experts model (qwen3_moe); their "
            "expert layers exchange tokens between the replicas, which vLLM's CPU build cannot do: set "
            "rollout.tensor_parallel_size=2 (one engine over all ranks) on a machine without a GPU"]
    one_engine = load_config(TINY, moe + ["parallel.world_size=2", "parallel.expert=2",
                                          "rollout.tensor_parallel_size=2"], environ={})
    assert not [e for e in pre_start_errors(one_engine, job="rl")[0] if "mixture-of-experts" in e]
    too_wide = load_config(TINY, moe + ["parallel.world_size=2", "parallel.expert=2",
                                        "rollout.tensor_parallel_size=4"], environ={})
    assert [e for e in pre_start_errors(too_wide, job="rl")[0] if e.startswith("rollout.")] == [
        "rollout.tensor_parallel_size=4 must divide the world size 2 (each vLLM engine replica spans "
        "rollout.tensor_parallel_size ranks)"]


def test_eval_greedy_output_is_checked_like_eval_output(tmp_path):
    """eval.greedy_output may not be eval.output, nor a file k15 eval did not write."""
    prompts = _write(tmp_path / "e.jsonl", [{"prompt": "1+1", "answer": "2"}])
    base = [f"data.eval_path={prompts}", "parallel.world_size=1", f"eval.output={tmp_path / 'eval.json'}"]
    same = load_config(TINY, base + [f"eval.greedy_output={tmp_path / 'eval.json'}"], environ={})
    assert pre_start_errors(same, job="eval")[0] == [
        f"eval.greedy_output={tmp_path / 'eval.json'} is eval.output too; give the greedy results a file of their own"]
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    foreign = load_config(TINY, base + [f"eval.greedy_output={tmp_path / 'notes.json'}"], environ={})
    assert pre_start_errors(foreign, job="eval")[0] == [
        f"eval.greedy_output={tmp_path / 'notes.json'}: {tmp_path / 'notes.json'} exists and is not an earlier "
        "k15 eval result; choose another eval.greedy_output (k15 eval replaces only its own results)"]
    fresh = load_config(TINY, base + [f"eval.greedy_output={tmp_path / 'greedy.json'}"], environ={})
    assert pre_start_errors(fresh, job="eval")[0] == []
