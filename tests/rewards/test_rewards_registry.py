"""Reward registry: the contract every registered reward meets, selection by a prompt's
reward / data_source fields, weighted combination, custom `module:function` rewards, metrics."""

from __future__ import annotations

import http.server
import json
import math
import threading

import pytest

from k15_megatron.config.rewards import (CodeRewardConfig, MathRewardConfig, RewardModelConfig,
                                         RewardsConfig)
from k15_megatron.rewards.judge import OpenAIJudge
from k15_megatron.rewards.registry import REGISTRY, RewardContext, RewardManager, resolve
from k15_megatron.rewards.sandbox import SandboxError

SUM_TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "4 4\n", "output": "8\n"}]
SUM_OK = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def length_reward(responses, samples, ctx):
    """A custom reward named by 'test_rewards_registry:length_reward' in the tests below."""
    return [min(1.0, len(r) / 10) for r in responses]


def broken_reward(responses, samples, ctx):
    raise RuntimeError("this reward is broken")


def out_of_range_reward(responses, samples, ctx):
    return [1.5, math.nan, 0.5][:len(responses)]


class _JudgeServer(http.server.BaseHTTPRequestHandler):
    """Answers every chat request with reasoning and a 'correct' verdict when the response
    under judgement contains the reference answer."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        reference = prompt.split("## Reference answer\n")[1].split("\n")[0]
        response = prompt.split("## Response\n")[1].split("\n## ")[0]
        verdict = {"correct": reference in response}
        content = f"Comparing the response with {reference}...\n{json.dumps(verdict)}"
        payload = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_judge():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JudgeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield OpenAIJudge(f"http://127.0.0.1:{server.server_port}/v1", "judge")
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def config():
    return RewardsConfig(math=MathRewardConfig(num_workers=1), code=CodeRewardConfig(num_workers=1),
                         sources={"gsm": "math", "apps": "code", "mixed": "math=0.75,code=0.25"})


CONTRACT_CASES = {
    "math": ([r"so \boxed{1/2}", r"\boxed{3}", "no answer", r"\boxed{" + "{" * 5000 + "}"],
             [{"answer": "0.5"}, {"answer": "4"}, {"answer": "1"}, {"answer": "1"}],
             [1.0, 0.0, 0.0, 0.0]),
    "code": ([SUM_OK, SUM_OK.replace("a + b", "a * b"), "no code block",
              "```python\nwhile 1: pass\n```"],
             [{"tests": SUM_TESTS}] * 4, [1.0, 0.0, 0.0, 0.0]),
    "rm": (["The answer is 42.", "It is 41.", "", "42, as drawn."],
           [{"prompt": "Life?", "answer": "42"}, {"prompt": "Life?", "answer": "42"},
            {"prompt": [{"role": "user", "content": "Life?"}], "answer": "42"},
            # a chat prompt record with an image part (k15 rl's image prompts): judged, not skipped
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "Life?"}]}], "answer": "42"}],
           [1.0, 0.0, 0.0, 1.0]),
}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_reward_meets_the_contract(name, config, http_judge):
    assert name in CONTRACT_CASES, f"add a contract case for the new reward {name!r}"
    responses, samples, expected = CONTRACT_CASES[name]
    cfg = RewardsConfig(math=config.math, code=CodeRewardConfig(num_workers=1, time_limit_s=1))
    scores = REGISTRY[name](responses, samples, RewardContext(cfg, judge=http_judge))
    assert isinstance(scores, list) and len(scores) == len(responses)
    assert all(type(s) is float and 0.0 <= s <= 1.0 for s in scores)
    assert scores == expected


def test_selection_by_reward_field_data_source_and_default(config):
    manager = RewardManager(config)
    assert manager.spec_for({"reward": "code", "data_source": "gsm"}) == {"code": 1.0}
    assert manager.spec_for({"reward": {"math": 2, "rm": 1}}) == {"math": 2.0, "rm": 1.0}
    assert manager.spec_for({"data_source": "apps"}) == {"code": 1.0}
    assert manager.spec_for({"data_source": "mixed"}) == {"math": 0.75, "code": 0.25}
    assert manager.spec_for({"data_source": "unknown"}) == {"math": 1.0}
    assert manager.spec_for({}) == {"math": 1.0}


def test_weighted_combination_and_metrics(config):
    manager = RewardManager(config)
    both = r"```python" + "\nprint(5)\n```\nso \\boxed{5}"  # right for math, half right for code
    samples = [{"data_source": "gsm", "answer": "5"},
               {"data_source": "apps", "tests": SUM_TESTS},
               {"data_source": "mixed", "answer": "5", "tests": SUM_TESTS},
               {"data_source": "apps", "tests": SUM_TESTS}]
    scores = manager.score([both, both, both, "no code here"], samples)
    assert scores == pytest.approx([1.0, 0.5, 0.75 * 1.0 + 0.25 * 0.5, 0.0])
    metrics = manager.metrics()
    assert metrics["rewards/math/items"] == 2 and metrics["rewards/code/items"] == 3
    assert metrics["rewards/math/calls"] == 1 and metrics["rewards/code/calls"] == 1
    assert metrics["rewards/math/mean"] == 1.0
    assert metrics["rewards/code/mean"] == pytest.approx(1.0 / 3)
    assert metrics["rewards/code/failures"] == 0 and metrics["rewards/code/no_code_block"] == 1
    assert metrics["rewards/code/latency_s"] > 0
    for protection in ("namespaces", "filesystem_allowlist", "seccomp"):
        assert metrics[f"rewards/code/isolation/{protection}"] == 1.0
    assert metrics["rewards/code/isolation/cgroup"] in (0.0, 1.0)
    assert manager.metrics() == {}  # reset after reading


def test_custom_rewards_and_failure_counting(config):
    manager = RewardManager(config)
    custom = "test_rewards_registry:length_reward"
    samples = [{"reward": f"{custom}=1,test_rewards_registry:broken_reward=1"},
               {"reward": custom}, {"reward": "test_rewards_registry:out_of_range_reward"},
               {"reward": "test_rewards_registry:out_of_range_reward"},
               {"reward": "test_rewards_registry:out_of_range_reward"}]
    scores = manager.score(["12345", "1234567890abc", "a", "b", "c"], samples)
    # the broken reward scores 0 and is counted; the custom one still counts half
    assert scores == pytest.approx([0.25, 1.0, 0.0, 0.0, 0.5])
    metrics = manager.metrics()
    assert metrics["rewards/test_rewards_registry:broken_reward/failures"] == 1
    assert metrics["rewards/test_rewards_registry:out_of_range_reward/failures"] == 2
    assert metrics[f"rewards/{custom}/failures"] == 0


def test_math_timeouts_reach_the_metrics():
    manager = RewardManager(RewardsConfig(math=MathRewardConfig(num_workers=1, time_limit_s=1)))
    assert manager.score([r"\boxed{9^{9^{9^{9}}}}"], [{"answer": "1"}]) == [0.0]
    assert manager.metrics()["rewards/math/timeouts"] == 1


def test_sandbox_failures_are_raised_not_scored(config):
    broken = RewardsConfig(code=CodeRewardConfig(num_workers=1,
                                                 python_executable="/nonexistent/python"))
    with pytest.raises(SandboxError):
        RewardManager(broken).score([SUM_OK], [{"reward": "code", "tests": SUM_TESTS}])


def test_user_errors_name_the_culprit(config):
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        resolve("nope")
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match=r"rewards\.default"):
        RewardManager(RewardsConfig(default="maths"))
    with pytest.raises(ValueError, match="needs a judge client"):
        REGISTRY["rm"](["x"], [{"prompt": "q"}], RewardContext(config))


@pytest.mark.slow
def test_rm_reward_through_the_manager_on_a_real_engine(judge_llm):
    import vllm

    from k15_megatron.rewards.judge import VLLMJudge

    judge = VLLMJudge(judge_llm, vllm.SamplingParams(max_tokens=16, temperature=0.0))
    manager = RewardManager(RewardsConfig(default="rm", rm=RewardModelConfig(backend="vllm")),
                            judge=judge)
    scores = manager.score(["4", "five"], [{"prompt": "2+2?", "answer": "4"},
                                           {"prompt": "2+3?", "answer": "5"}])
    assert scores == [0.0, 0.0]  # random weights produce no verdict...
    assert manager.metrics()["rewards/rm/parse_failures"] == 2  # ...and that is counted


def test_unknown_reward_in_a_sample_raises_naming_it(config):
    with pytest.raises(ValueError, match="unknown reward 'mathz'"):
        RewardManager(config).score(["x"], [{"reward": "mathz"}])


def test_the_judge_sees_a_chat_prompt_as_text():
    from k15_megatron.rewards.registry import _prompt_text

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Count."}]},
                {"role": "assistant", "content": "3"}, {"role": "user", "content": "Sure?"}]
    assert _prompt_text(messages) == "<image>Count.\n3\nSure?"
