"""One reward failure costs only its own samples, and every failure is counted and logged.

Real components throughout: the math-verify worker pool (with a CPU-limit timeout), a crashing
custom reward imported through the ``package.module:function`` mechanism, a judge whose
endpoint times out (a real HTTP server and the real `OpenAIJudge`), and the RL job's reward
stage writing through the real `MetricsLogger` into metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from k15_megatron.config.rewards import MathRewardConfig, RewardModelConfig, RewardsConfig
from k15_megatron.config.rl import RLConfig
from k15_megatron.rewards import math as mr
from k15_megatron.rewards.registry import RewardConfigError, RewardManager

CUSTOM = '''
def crashing(responses, samples, ctx):
    """1.0 for responses saying "good"; raises on any response saying "CRASH"."""
    if any("CRASH" in r for r in responses):
        raise RuntimeError("custom reward crashed")
    return [1.0 if "good" in r else 0.0 for r in responses]
'''


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "k15_test_custom_rewards.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "k15_test_custom_rewards:crashing"


@pytest.fixture(scope="module")
def math_cfg():
    cfg = MathRewardConfig(time_limit_s=1.0, num_workers=1)
    assert mr.score(r"\boxed{1}", "1", config=cfg) == 1.0  # worker started before timing
    yield cfg
    mr.get_scorer(cfg).close()


def test_failures_cost_only_their_own_samples(math_cfg, custom_module):
    manager = RewardManager(RewardsConfig(math=math_cfg, sources={"custom": custom_module}))
    samples = [{"answer": "4"},                      # right
               {"prompt": "no gold answer here"},    # record without `answer`
               {"answer": "1"},                      # a hang in sympy: CPU-limit timeout
               {"data_source": "custom"},            # custom reward raises on this one
               {"data_source": "custom"},            # ... but not on this one
               {"answer": r"\frac{1}{2}"}]           # right
    responses = [r"\boxed{4}", r"\boxed{4}", r"\boxed{9^{9^{9^{9}}}}", "CRASH", "good",
                 r"\boxed{0.5}"]
    assert manager.score(responses, samples) == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    metrics = manager.metrics()
    assert metrics["rewards/math/items"] == 4 and metrics["rewards/math/failures"] == 1
    assert metrics["rewards/math/missing_answer"] == 1 and metrics["rewards/math/timeouts"] == 1
    assert metrics[f"rewards/{custom_module}/failures"] == 1
    assert metrics[f"rewards/{custom_module}/batch_retries"] == 1
    assert metrics[f"rewards/{custom_module}/mean"] == 0.5
    assert metrics["rewards/math/latency_s"] > 0 and metrics["rewards/math/latency_per_call_s"] > 0
    assert manager.metrics() == {}  # reset after reading


class _SlowJudge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that answers 'correct' at once, but stalls on SLOW."""

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "SLOW" in body["messages"][0]["content"]:
            time.sleep(3)
        payload = {"choices": [{"message": {"content": 'fine. {"correct": true}'}}]}
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            self.wfile.write(json.dumps(payload).encode())
        except OSError:
            pass  # the client gave up (timed out)

    def log_message(self, *args):
        pass


def test_a_judge_timeout_fails_only_its_sample():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rm = RewardModelConfig(backend="openai", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                               model="judge", request_timeout_s=1.0)
        manager = RewardManager(RewardsConfig(rm=rm, default="rm"))
        samples = [{"prompt": "q1"}, {"prompt": "q2"}, {"prompt": "q3"}]
        assert manager.score(["ok", "SLOW", "ok"], samples) == [1.0, 0.0, 1.0]
        metrics = manager.metrics()
        assert metrics["rewards/rm/failures"] == 1 and metrics["rewards/rm/request_failures"] == 1
        assert "rewards/rm/parse_failures" not in metrics
    finally:
        server.shutdown()
        server.server_close()


def test_rm_without_an_endpoint_is_a_config_error_naming_the_key():
    manager = RewardManager(RewardsConfig(rm=RewardModelConfig(backend="vllm")))
    with pytest.raises(RewardConfigError, match="rewards.rm.backend=openai"):
        manager.score(["x"], [{"prompt": "q", "reward": "rm"}])
    with pytest.raises(ValueError, match="rewards.rm.base_url"):
        RewardManager(RewardsConfig()).score(["x"], [{"prompt": "q", "reward": "rm"}])


def _batch(tokenizer, responses: list[str], group_size: int):
    from k15_megatron.config.rl import ReplayConfig
    from k15_megatron.rl.replay import SegmentReplayBuffer

    buffer = SegmentReplayBuffer(ReplayConfig(), group_size=group_size)
    for prompt_id in range(len(responses) // group_size):
        tids = buffer.add_group(prompt_id, torch.tensor(tokenizer.encode("Q:")))
        for tid, text in zip(tids, responses[prompt_id * group_size:]):
            ids = torch.tensor(tokenizer.encode(text))
            buffer.add_segment(tid, ids, torch.zeros(len(ids)), iteration=0, policy_version=0,
                               finish_reason="stop")
    return buffer.pop_batch(iteration=0)


def test_reward_failure_metrics_reach_metrics_jsonl_and_tensorboard(tmp_path, math_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from k15_megatron.jobs.metrics_log import MetricsLogger
    from k15_megatron.jobs.rl_rewards import score_rollouts
    from k15_megatron.models.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    batch = _batch(tokenizer, [r"\boxed{4}", r"\boxed{5}", r"\boxed{7}", r"\boxed{7}"], 2)
    records = [{"answer": "4"}, {"prompt": "a record without its gold answer"}]
    manager = RewardManager(RewardsConfig(math=math_cfg))
    correct, metrics = score_rollouts(batch, records, manager, tokenizer, RLConfig(), 0)
    assert correct.tolist() == [True, False, False, False]
    assert batch.rewards.tolist()[:2] == [1.0, 0.0]
    logging_cfg = SimpleNamespace(dir=str(tmp_path), jsonl=True, tensorboard=True, log_interval=1)
    logger = MetricsLogger(logging_cfg, enabled=True)
    logger.log(1, metrics)
    logger.close()
    with open(os.path.join(tmp_path, "metrics.jsonl")) as handle:
        record = json.loads(handle.readline())
    assert record["rewards/math/failures"] == 2 and record["rewards/math/missing_answer"] == 2
    assert record["rewards/math/latency_s"] > 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "rewards/math/failures" in scalars and "rewards/math/latency_per_call_s" in scalars
    assert events.Scalars("rewards/math/failures")[0].value == 2
