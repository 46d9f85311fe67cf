"""`k15 eval` as a user runs it (one process, the real vLLM CPU engine): its output is its own
lines only (no vLLM config dump, no library warnings, no progress bars), it says what it wrote,
and beside ``eval.json`` it keeps every generated text with its reward in
``eval_samples.jsonl``; ``eval.greedy_output`` adds a greedy evaluation from the same start, in
the same format. (``--verbose``, which brings the library output back, is checked on
`k15 sample`'s run in test_sample_job.py: the same start-up.)"""

import json
import subprocess
import sys

import pytest
from tooling import REPO_ROOT

from rl_runs import write_task

NUM_SAMPLES, MAX_TOKENS = 2, 24
LIBRARY_MARKERS = ("non-default args", "Initializing a V1 LLM engine", "UserWarning", "FutureWarning",
                   "Loading safetensors checkpoint shards", "Writing model shards", "Warning: NUMA")


def _eval(tmp_path, *extra):
    cmd = [sys.executable, "-m", "k15_megatron.cli", "eval", "examples/tiny.yaml", f"run_dir={tmp_path / 'run'}",
           f"data.eval_path={tmp_path / 'eval.jsonl'}", "rollout.max_model_len=96",
           f"rollout.max_response_tokens={MAX_TOKENS}", "rollout.cpu_kv_cache_gib=0.25",
           f"eval.num_samples={NUM_SAMPLES}", "eval.temperature=1.0", f"eval.ks=[1,{NUM_SAMPLES}]", *extra]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


@pytest.mark.slow
def test_eval_output_is_readable_and_keeps_the_generated_texts(tmp_path):
    write_task(str(tmp_path))
    greedy_json = tmp_path / "greedy.json"
    lines = _eval(tmp_path, f"eval.greedy_output={greedy_json}")
    noise = [line for line in lines if any(m in line for m in LIBRARY_MARKERS)]
    assert not noise and len(lines) <= 8, "\n".join(lines)  # was 62 lines before the quiet default
    eval_json, samples_file = tmp_path / "run" / "eval.json", tmp_path / "run" / "eval_samples.jsonl"
    assert f"eval: wrote {eval_json} and {samples_file}" in lines

    metrics = json.loads(eval_json.read_text())
    prompts = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert [(r["index"], r["prompt"], r["answer"]) for r in records] == \
        [(i, p["prompt"], p["answer"]) for i, p in enumerate(prompts)]
    assert [r["pass_rate"] for r in records] == metrics["per_prompt"]
    lengths = []
    for record in records:
        assert len(record["samples"]) == NUM_SAMPLES
        for sample in record["samples"]:
            assert isinstance(sample["text"], str) and sample["finish_reason"] in ("stop", "max_length", "repeat")
            assert sample["correct"] == (sample["reward"] >= 1.0 - 1e-6)
            assert 0 < sample["length"] <= MAX_TOKENS
            lengths.append(sample["length"])
    assert sum(lengths) / len(lengths) == pytest.approx(metrics["eval/response_length_mean"])

    greedy = json.loads(greedy_json.read_text())
    greedy_records = [json.loads(line) for line in (tmp_path / "greedy_samples.jsonl").read_text().splitlines()]
    assert f"eval: wrote {greedy_json} and {tmp_path / 'greedy_samples.jsonl'}" in lines
    assert (greedy["num_samples"], greedy["temperature"]) == (1, 0.0) and "eval/pass@2" not in greedy
    assert len(greedy["per_prompt"]) == len(prompts) and set(greedy["per_prompt"]) <= {0.0, 1.0}
    assert [len(r["samples"]) for r in greedy_records] == [1] * len(prompts)
    assert greedy["eval/pass@1"] == pytest.approx(sum(greedy["per_prompt"]) / len(prompts))
