"""`k15 sample` (shortest rejection sampling) as a user runs it: one process, the real vLLM CPU
engine, a random-weight model on arithmetic prompts whose rewards are properties of the text
(tests/jobs/sample_rewards.py), so some prompts have correct responses and one has none. The SFT
file holds, for each prompt with a correct response, the shortest one (ties: the first drawn),
as recomputed here from the grouped file, and `k15 sft`'s reader accepts it. The run is started
with ``--verbose``: the library output a quiet job hides (vLLM's engine start-up, Megatron's
import-time warnings) is back."""

import json
import subprocess
import sys

from tooling import REPO_ROOT

NUM_SAMPLES, MAX_TOKENS = 4, 16
EVEN, NEVER = "tests.jobs.sample_rewards:even_length_reward", "tests.jobs.sample_rewards:never_reward"


def _write_prompts(path) -> list:
    from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits
    from k15_megatron.data.jsonl import write_jsonl

    records = generate_splits(ArithmeticTaskConfig(num_sft=0, num_train=6, num_eval=1, max_operands=3))["train"]
    records = [{**r, "reward": NEVER if i == 0 else EVEN} for i, r in enumerate(records)]
    write_jsonl(str(path), records)
    return records


def _expected_choice(group: dict):
    """Index of the shortest correct response (first of ties), None without one."""
    correct = [i for i, ok in enumerate(group["correct"]) if ok]
    return min(correct, key=lambda i: (group["lengths"][i], i)) if correct else None


def test_sample_keeps_the_shortest_correct_response_of_each_prompt(tmp_path):
    from k15_megatron.data.jsonl import read_sft

    records = _write_prompts(tmp_path / "prompts.jsonl")
    output, groups_output = tmp_path / "shortest.jsonl", tmp_path / "groups.jsonl"
    cmd = [sys.executable, "-m", "k15_megatron.cli", "sample", "examples/tiny.yaml", f"run_dir={tmp_path / 'run'}",
           f"data.train_path={tmp_path / 'prompts.jsonl'}", "rollout.max_model_len=96",
           f"rollout.max_response_tokens={MAX_TOKENS}", "rollout.cpu_kv_cache_gib=0.25",
           f"sample.num_samples={NUM_SAMPLES}", f"sample.output={output}", f"sample.groups_output={groups_output}",
           "--verbose"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    groups = [json.loads(line) for line in groups_output.read_text().splitlines()]
    assert [g["prompt"] for g in groups] == [r["prompt"] for r in records]
    for group in groups:
        assert len(group["responses"]) == len(group["correct"]) == len(group["lengths"]) == NUM_SAMPLES
        assert group["correct"] == [len(t) % 2 == 0 and group["reward"] == EVEN for t in group["responses"]]
        assert all(0 < n <= MAX_TOKENS for n in group["lengths"])
    chosen = [(g, _expected_choice(g)) for g in groups]
    expected = [{**r, "response": g["responses"][i]} for r, (g, i) in zip(records, chosen) if i is not None]
    assert chosen[0][1] is None and len(expected) >= 2  # the never-correct prompt is skipped
    sft = [json.loads(line) for line in output.read_text().splitlines()]
    assert sft == expected
    assert len(read_sft(str(output))) == len(expected)  # k15 sft reads it
    lines = (proc.stdout + proc.stderr).splitlines()
    skipped = len(records) - len(expected)
    assert any(line.startswith(f"sample: {len(expected)} of {len(records)} prompts have a correct response "
                               f"({skipped} without, skipped)") for line in lines), "\n".join(lines[-20:])
    assert f"sample: wrote {output} and {groups_output}" in lines
    assert any("Initializing a V1 LLM engine" in line for line in lines), "\n".join(lines[-40:])
    assert any("UserWarning" in line for line in lines)  # Megatron's import-time warnings


def test_sft_and_group_records_keep_the_prompt_and_make_image_paths_absolute(tmp_path):
    from k15_megatron.data.sampled import group_record, sft_record

    chat = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/a.png"},
                                                      {"type": "text", "text": "What is it?"}]}], "answer": "7"}
    out = sft_record(chat, "7", base_dir="/data")
    assert out["messages"][-1] == {"role": "assistant", "content": "7"} and out["answer"] == "7"
    assert out["messages"][0]["content"][0]["image"] == "/data/img/a.png"
    assert chat["messages"][0]["content"][0]["image"] == "img/a.png"  # the input is not changed
    plain = {"prompt": "<image> and <image>?", "images": ["a.png", "/abs/b.png", {"bytes": "AAAA"}], "answer": "1"}
    assert sft_record(plain, "1", base_dir="/d")["images"] == ["/d/a.png", "/abs/b.png", {"bytes": "AAAA"}]
    group = group_record({"prompt": "p"}, texts=["a", "bb"], correct=[0, 1], lengths=[1, 2], rewards=[0, 1.0],
                         base_dir="/d")
    assert group == {"prompt": "p", "responses": ["a", "bb"], "correct": [False, True], "lengths": [1, 2],
                     "rewards": [0.0, 1.0]}
