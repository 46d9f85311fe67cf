"""Chain-of-thought reward model: prompt rendering, the verdict parser on crafted judge outputs,
and both clients end to end against real engines (an in-process vLLM LLM and `vllm serve`).

The tiny judge model has random weights, so its text is garbage: the engine tests prove the
whole path runs (prompt -> engine -> text -> parser) and that garbage scores 0 with a reason.
What the parser does with well-formed verdicts is tested on crafted strings.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from k15_megatron.config.rewards import RewardModelConfig
from k15_megatron.rewards.judge import (DEFAULT_TEMPLATE, JudgeReply, OpenAIJudge, VLLMJudge,
                                        judge_batch, last_json_object, parse_verdict,
                                        render_prompt)

REASONING = "The response computes 2 + 2 = 4, which matches the reference.\n"


@pytest.mark.parametrize("text,score", [
    (REASONING + '{"correct": true, "score": 1.0}', 1.0),
    (REASONING + '{"correct": false, "score": 0.0}', 0.0),
    (REASONING + '```json\n{"correct": true}\n```', 1.0),
    (REASONING + '{"score": 0.7}', 0.7),
    (REASONING + '{"correct": "true"}', 1.0),
    # the LAST object counts, even when the reasoning quoted another one first
    ('I might say {"correct": true} but on reflection\n{"correct": false}', 0.0),
    ('At first {"correct": false}; re-checking the algebra...\n{"correct": true}', 1.0),
    # nested objects: the outermost one that ends last
    (REASONING + '{"correct": true, "checks": {"algebra": false, "units": true}}', 1.0),
])
def test_well_formed_verdicts(text, score):
    verdict = parse_verdict(text)
    assert verdict.score == score and verdict.reason == ""


@pytest.mark.parametrize("text,reason", [
    (None, "empty judge output"),
    ("   ", "empty judge output"),
    (REASONING + "so it is correct.", "no JSON object"),
    (REASONING + '{"correct": tru}', "no JSON object"),
    (REASONING + '{"correct": true', "no JSON object"),
    (REASONING + "[true, 1.0]", "no JSON object"),
    (REASONING + '{"verdict": "correct"}', "neither 'correct' nor 'score'"),
    (REASONING + '{"correct": "yes"}', "'correct' is not a boolean"),
    (REASONING + '{"correct": 1}', "'correct' is not a boolean"),
    (REASONING + '{"score": 1.5}', "outside [0, 1]"),
    (REASONING + '{"score": "0.9"}', "'score' is not a number"),
    (REASONING + '{"score": true}', "'score' is not a number"),
])
def test_malformed_or_missing_verdicts_score_zero_with_a_reason(text, reason):
    verdict = parse_verdict(text)
    assert verdict.score == 0.0 and reason in verdict.reason


def test_parser_cost_is_bounded_on_brace_floods():
    start = time.monotonic()
    assert parse_verdict("{" * 200_000).score == 0.0
    assert parse_verdict('{"a": ' * 50_000 + '{"correct": true}').score == 1.0
    assert time.monotonic() - start < 5
    assert last_json_object('x {"a": 1} y {"b": {"c": 2}} z') == {"b": {"c": 2}}


def test_prompt_rendering():
    prompt = render_prompt("What is 2+2?", "It is {reference}... \\boxed{4}", "4")
    assert "What is 2+2?" in prompt and "\\boxed{4}" in prompt
    assert "It is {reference}..." in prompt  # fields inside the response stay literal
    assert '{"correct": true' in prompt  # the format instruction survives
    assert "(none given)" in render_prompt("q", "r")
    custom = render_prompt("Q", "R", template="Judge {response} for {question}")
    assert custom == "Judge R for Q"
    assert "{question}" in DEFAULT_TEMPLATE and "{response}" in DEFAULT_TEMPLATE


class _ListClient:
    """Returns canned replies (for the batching logic only; real engines are tested below)."""

    def __init__(self, replies):
        self.replies, self.prompts = replies, None

    def complete(self, prompts):
        self.prompts = list(prompts)
        return self.replies


def test_judge_batch_maps_failed_requests_to_zero():
    client = _ListClient([JudgeReply('ok {"correct": true}'), JudgeReply(None, "HTTP 503")])
    verdicts = judge_batch(client, ["q1", "q2"], ["r1", "r2"], ["a1", "a2"])
    assert [v.score for v in verdicts] == [1.0, 0.0] and verdicts[1].reason == "HTTP 503"
    assert "q2" in client.prompts[1] and "a2" in client.prompts[1]
    with pytest.raises(ValueError, match="2 questions but 1 responses"):
        judge_batch(client, ["q1", "q2"], ["r1"])


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True])
def test_vllm_judge_on_a_real_engine(judge_llm, chat):
    import vllm

    params = vllm.SamplingParams(max_tokens=24, temperature=0.0, seed=0)
    judge = VLLMJudge(judge_llm, params, chat=chat)
    questions = ["What is 2+2?", "Name a prime.", "Solve x+1=3."]
    responses = ["\\boxed{4}", "7", "x = 2"]
    replies = judge.complete([render_prompt(q, r) for q, r in zip(questions, responses)])
    assert len(replies) == 3 and all(r.text is not None for r in replies)
    verdicts = judge_batch(judge, questions, responses, ["4", "any prime", "2"])
    assert [v.score for v in verdicts] == [0.0, 0.0, 0.0]
    assert all(v.reason for v in verdicts)  # garbage text: a parse failure, stated
    # a response too long for the judge's context fails alone; the others still get text
    replies = judge.complete([render_prompt("q", "x" * 5000), render_prompt("q", "short")])
    assert replies[0].text is None and "maximum context length" in replies[0].error
    assert replies[1].text is not None


@pytest.mark.slow
def test_openai_judge_against_vllm_serve(served_judge, monkeypatch):
    base_url, model, api_key = served_judge
    monkeypatch.setenv("K15_JUDGE_KEY", api_key)
    cfg = RewardModelConfig(backend="openai", base_url=base_url, model=model,
                            api_key_env="K15_JUDGE_KEY", max_tokens=16, max_concurrency=2)
    judge = OpenAIJudge.from_config(cfg)
    replies = judge.complete([render_prompt("What is 2+2?", "4"), render_prompt("1+1?", "2")])
    assert all(r.text is not None and r.error == "" for r in replies), replies
    verdicts = judge_batch(judge, ["What is 2+2?"], ["4"])
    assert verdicts[0].score == 0.0 and verdicts[0].reason  # garbage from random weights
    # failures are replies with a reason, not exceptions
    unauthorised = OpenAIJudge(base_url, model, api_key="wrong").complete(["x"])[0]
    assert unauthorised.text is None and "HTTP 401" in unauthorised.error
    unknown = OpenAIJudge(base_url, "no-such-model", api_key=api_key).complete(["x"])[0]
    assert unknown.text is None and "HTTP 404" in unknown.error
    slow = OpenAIJudge(base_url, model, api_key=api_key, timeout_s=1e-4).complete(["x"])[0]
    assert slow.text is None and "failed" in slow.error


class _Handler(http.server.BaseHTTPRequestHandler):
    bodies: list = []
    reply: bytes = b""

    def do_POST(self):  # noqa: N802 (http.server naming)
        length = int(self.headers["Content-Length"])
        type(self).bodies.append((self.path, json.loads(self.rfile.read(length))))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).reply)

    def log_message(self, *args):
        pass


def test_openai_judge_protocol_against_a_stdlib_server():
    """Protocol test (request shape, malformed response bodies) against a minimal stdlib
    server; the real-server test above covers a working endpoint."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{server.server_port}/v1/"
    try:
        _Handler.reply = json.dumps({"choices": [{"message": {
            "role": "assistant", "content": 'reasoning... {"correct": true}'}}]}).encode()
        judge = OpenAIJudge(base_url, "judge-7b", max_tokens=33, temperature=0.5)
        assert [v.score for v in judge_batch(judge, ["q"], ["r"])] == [1.0]
        path, body = _Handler.bodies[-1]
        assert path == "/v1/chat/completions"
        assert body["model"] == "judge-7b" and body["max_tokens"] == 33
        assert body["temperature"] == 0.5 and body["messages"][0]["role"] == "user"
        for bad in (b"not json", b'{"choices": []}', b'{"choices": [{"message": {}}]}',
                    b'{"choices": [{"message": {"content": null}}]}'):
            _Handler.reply = bad
            reply = judge.complete(["q"])[0]
            assert reply.text is None and "malformed response" in reply.error
    finally:
        server.shutdown()
        server.server_close()
    refused = OpenAIJudge(base_url, "m").complete(["q"])[0]  # server gone: connection refused
    assert refused.text is None and "failed" in refused.error


@pytest.mark.slow
def test_rm_reward_from_job_config_through_vllm_serve(served_judge, monkeypatch):
    """The ``rm`` reward as `k15 rl` / `k15 eval` build it: `load_config` with ``rewards.rm.*``
    overrides, then ``RewardManager(cfg.rewards)``; a config default and a record's own
    ``reward`` field both select it, and it scores through the real served judge."""
    from k15_megatron.config.loader import load_config
    from k15_megatron.rewards.registry import RewardManager

    base_url, model, api_key = served_judge
    monkeypatch.setenv("K15_JUDGE_KEY", api_key)
    cfg = load_config(None, ["rewards.rm.backend=openai", f"rewards.rm.base_url={base_url}",
                             f"rewards.rm.model={model}", "rewards.rm.api_key_env=K15_JUDGE_KEY",
                             "rewards.rm.max_tokens=16", "rewards.default=math=0.5,rm=0.5"],
                      check=False)
    manager = RewardManager(cfg.rewards)
    samples = [{"prompt": "What is 2+2?", "answer": "4"},
               {"prompt": [{"role": "user", "content": "Name a prime."}], "reward": "rm"}]
    scores = manager.score(["so \\boxed{4}", "7"], samples)
    metrics = manager.metrics()
    # random judge weights: garbage verdicts score 0 with a counted parse failure; the math
    # half of the first sample's weighted mean still counts
    assert scores == [0.5, 0.0]
    assert metrics["rewards/rm/items"] == 2 and metrics["rewards/rm/failures"] == 0
    assert metrics["rewards/rm/parse_failures"] == 2 and metrics["rewards/rm/latency_s"] > 0
    assert metrics["rewards/math/mean"] == 1.0
    # a wrong key makes every request fail: counted failures, never an exception
    monkeypatch.setenv("K15_JUDGE_KEY", "wrong")
    failing = RewardManager(cfg.rewards)
    assert failing.score(["7"], [samples[1]]) == [0.0]
    assert failing.metrics()["rewards/rm/request_failures"] == 1
