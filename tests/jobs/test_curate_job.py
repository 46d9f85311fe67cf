"""`k15 curate` as a user runs it (one process, the real vLLM CPU engine, a random-weight model)
on a hand-made prompt set whose multiple-choice, true/false, proof, easy-to-hack and always
solved prompts are known (rewards of tests/jobs/sample_rewards.py make "hackable" and "solved"
properties of the prompt): the report removes exactly those, and the kept prompts carry the
difficulty labels of their samples."""

import json
import subprocess
import sys

import pytest
from tooling import REPO_ROOT

MODULE = "tests.jobs.sample_rewards"
DIFFICULTY_SAMPLES = 4
RECORDS = [
    {"prompt": "Which of the following equals 2+2?\nA) 3\nB) 4", "answer": "B", "kind": "multiple_choice"},
    {"prompt": "Compute 3+4.\n(A) 7\n(B) 8", "answer": "A", "kind": "multiple_choice"},
    {"prompt": "True or false: 3+4=7.", "answer": "true", "kind": "true_false"},
    {"prompt": "Prove that the sum of two even numbers is even.", "answer": "even", "kind": "proof"},
    {"prompt": "Compute: 5+6", "answer": "11", "reward": f"{MODULE}:direct_answer_reward", "kind": "easy to hack"},
    {"prompt": "Compute: 7+1", "answer": "8", "reward": f"{MODULE}:direct_answer_reward", "kind": "easy to hack"},
    {"prompt": "Compute: 9-4", "answer": "5", "reward": f"{MODULE}:chain_of_thought_reward",
     "kind": "solved by every difficulty sample"},
    {"prompt": "Compute: 2+2+2", "answer": "6", "reward": f"{MODULE}:chain_of_thought_reward",
     "kind": "solved by every difficulty sample"},
    {"prompt": "Compute: 8-3", "answer": "5", "reward": f"{MODULE}:never_reward", "kind": "kept"},
    {"prompt": "Compute: 4+5", "answer": "9", "reward": f"{MODULE}:even_length_with_reasoning_reward", "kind": "kept"},
    {"prompt": "Compute: 6+6", "answer": "12", "reward": f"{MODULE}:even_length_with_reasoning_reward", "kind": "kept"},
]


def test_curate_removes_exactly_the_known_prompts_and_labels_the_rest(tmp_path):
    from k15_megatron.data.jsonl import read_prompts

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    output, report = tmp_path / "curated.jsonl", tmp_path / "report.md"
    cmd = [sys.executable, "-m", "k15_megatron.cli", "curate", "examples/tiny.yaml", f"run_dir={tmp_path / 'run'}",
           f"data.train_path={tmp_path / 'prompts.jsonl'}", "rollout.max_model_len=160", "rollout.max_response_tokens=16",
           "rollout.cpu_kv_cache_gib=0.25", "curate.hack_samples=2", "curate.hack_max_tokens=8",
           f"curate.difficulty_samples={DIFFICULTY_SAMPLES}", f"curate.output={output}", f"curate.report={report}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((tmp_path / "report.json").read_text())
    expected = {}
    for record in RECORDS:
        if record["kind"] != "kept":
            expected[record["kind"]] = expected.get(record["kind"], 0) + 1
    assert summary["removed"] == expected and summary["read"] == len(RECORDS)
    kept = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in kept] == [r["prompt"] for r in RECORDS if r["kind"] == "kept"]
    for record in kept:
        assert record["difficulty"] == round((1 - record["pass_rate"]) * DIFFICULTY_SAMPLES)
        assert 0 <= record["pass_rate"] < 1
    assert kept[0]["pass_rate"] == 0 and kept[0]["difficulty"] == DIFFICULTY_SAMPLES  # never correct
    assert len(read_prompts(str(output))) == len(kept)  # k15 rl reads it
    text = report.read_text()
    assert "| easy to hack | 2 |" in text and "Prove that the sum" in text
    lines = (proc.stdout + proc.stderr).splitlines()
    assert f"curate: wrote {output} and {report}" in lines, "\n".join(lines[-20:])


@pytest.mark.parametrize("prompt,answer,rule", [
    ("Which of the following is prime?\n(A) 4\n(B) 5", "B", "multiple_choice"),
    ("Compute 2+2.", "c", "multiple_choice"),  # a lone option letter as the answer
    ("Is the statement true? 2 > 1", "yes", "true_false"),
    ("Show that x^2 >= 0 for real x.", None, "proof"),
    ("Compute 12*3 and box the answer.", "36", None),
    ("A) warm-up: compute 2+3", "5", None),  # one option-like line is not a list of options
])
def test_default_format_rules(prompt, answer, rule):
    from k15_megatron.config.curate import CurateConfig
    from k15_megatron.data.curation import compile_rules, matching_rule

    c = CurateConfig()
    rules = compile_rules(c.prompt_patterns, c.answer_patterns, c.drop_formats)
    assert matching_rule(prompt, answer, rules) == rule


def test_bad_rules_are_refused_naming_the_key():
    from k15_megatron.config.curate import CurateConfig

    errors = CurateConfig(drop_formats=["essay"], prompt_patterns={"proof": ["(unclosed"]}).config_errors("curate")
    assert any(e.startswith("curate.drop_formats: no patterns for 'essay'") for e in errors)
    assert any(e.startswith("curate.prompt_patterns.proof: '(unclosed' is not a regular expression") for e in errors)
