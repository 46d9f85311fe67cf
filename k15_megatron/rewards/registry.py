"""Reward registry: which reward scores which prompt, weighted combinations, and metrics.

Contract of a reward function (built-in or custom)::

    fn(responses: Sequence[str], samples: Sequence[Mapping[str, Any]], ctx: RewardContext)
        -> list[float]        # one value in [0, 1] per response, same order

``samples[i]`` is the prompt record ``responses[i]`` answers (the data loader's row). Keys the
built-ins read: ``math`` needs ``answer`` (the gold); ``code`` needs ``tests`` (see
`k15_megatron.rewards.code`) and optionally ``language``, and takes the last fenced code block
of the response as the program; ``rm`` reads ``prompt`` (a string, or chat messages whose
contents are joined) and optionally ``answer`` as the reference.

Selection (`RewardManager.spec_for`): a sample's own ``reward`` field (a spec string, or a
``{name: weight}`` dict) wins; else ``config.sources[sample["data_source"]]``; else
``config.default``. A spec names registered rewards or ``package.module:function`` strings,
several with weights (``"math=0.8,rm=0.2"``); the combined reward is the weighted mean.

Failures stay with the samples they belong to. A reward function returns NaN for an item it
could not score (a record without the field it needs, a judge request that failed or timed
out); a function that raises on a batch is called again item by item, so only the items it
raises on fail. Every failed item scores 0 and is counted; the rest of the batch keeps its
rewards. A sandbox that cannot run at all (`SandboxError`) and a configuration error
(`RewardConfigError`) are not swallowed: they raise.

`RewardManager.metrics()` reports per reward name: calls, items, failures, total latency in
seconds and mean latency per call, mean reward, plus event counters the rewards add
(``math/timeouts``, ``math/missing_answer``, ``code/no_code_block``, ``rm/request_failures``,
``rm/parse_failures``...), and for ``code`` which sandbox protections were active
(``code/isolation/{namespaces,filesystem_allowlist,seccomp,cgroup}``, 1 or 0). `k15 rl`
logs them with every iteration's metrics (metrics.jsonl and TensorBoard), `k15 eval` with its
results.

The ``rm`` reward's judge: a client passed as ``RewardManager(config, judge=...)`` (e.g. a
`VLLMJudge` on an engine the caller owns), else, with ``rewards.rm.backend=openai``, an
`OpenAIJudge` built from ``rewards.rm.*`` on first use (any OpenAI-compatible endpoint, such
as a local ``vllm serve``): the path `k15 rl` and `k15 eval` take.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from k15_megatron.config.rewards import RewardsConfig, parse_reward_spec
from k15_megatron.rewards.sandbox import SandboxError

logger = logging.getLogger(__name__)


@dataclass
class RewardContext:
    """What reward functions may use besides their inputs: the config, the judge client (for
    ``rm``) and ``count(name, event, n)`` to report events into the metrics."""

    config: RewardsConfig
    judge: Any = None
    events: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def count(self, reward: str, event: str, n: float = 1) -> None:
        """Add ``n`` to the metric ``rewards/<reward>/<event>``."""
        self.events[f"rewards/{reward}/{event}"] += n


RewardFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]], RewardContext], list[float]]


class RewardConfigError(ValueError):
    """A reward cannot run as configured (raised, never scored as 0)."""


def _missing(samples: Sequence[Mapping[str, Any]], key: str, reward: str,
             ctx: RewardContext) -> list[bool]:
    """Which samples lack ``key``; counts and logs them as ``<reward>/missing_<key>``."""
    missing = [key not in s for s in samples]
    if any(missing):
        ctx.count(reward, f"missing_{key}", sum(missing))
        logger.warning("reward %r needs sample[%r]; %d of %d samples lack it (scored 0)",
                       reward, key, sum(missing), len(samples))
    return missing


def math_reward(responses: Sequence[str], samples: Sequence[Mapping[str, Any]],
                ctx: RewardContext) -> list[float]:
    """Rule-based answer checking against ``sample["answer"]`` (`rewards.math`)."""
    from k15_megatron.rewards.math import get_scorer

    missing = _missing(samples, "answer", "math", ctx)
    todo = [i for i, m in enumerate(missing) if not m]
    results = get_scorer(ctx.config.math).check_batch([responses[i] for i in todo],
                                                       [str(samples[i]["answer"]) for i in todo])
    scores = [math.nan] * len(responses)
    for i, r in zip(todo, results):
        scores[i] = r.score
        if r.reason.startswith("timeout"):
            ctx.count("math", "timeouts")
        elif r.reason and not r.reason.startswith(("no ", "empty")):
            ctx.count("math", "rejected_inputs")
    return scores


def code_reward(responses: Sequence[str], samples: Sequence[Mapping[str, Any]],
                ctx: RewardContext) -> list[float]:
    """Sandboxed tests ``sample["tests"]`` on the response's last fenced code block."""
    from k15_megatron.rewards.code import extract_code, isolation_metrics, run_tests_batch

    missing = _missing(samples, "tests", "code", ctx)
    scores = [math.nan if m else 0.0 for m in missing]
    todo = []
    for i, (response, sample) in enumerate(zip(responses, samples)):
        program = None if missing[i] else extract_code(response)
        if program is None and not missing[i]:
            ctx.count("code", "no_code_block")
        elif program is not None:
            todo.append((i, program, list(sample["tests"]), sample.get("language", "python")))
    if todo:
        ctx.events.update(isolation_metrics(ctx.config.code))
        results = run_tests_batch([t[1] for t in todo], [t[2] for t in todo],
                                  [t[3] for t in todo], config=ctx.config.code)
        for (i, *_), result in zip(todo, results):
            scores[i] = result.reward
            if result.error:
                ctx.count("code", "program_errors")
    return scores


def rm_reward(responses: Sequence[str], samples: Sequence[Mapping[str, Any]],
              ctx: RewardContext) -> list[float]:
    """Chain-of-thought reward model (`rewards.judge`) through ``ctx.judge``. A failed or
    timed-out request is a failure of that item (NaN); an unparsable verdict is a 0."""
    from k15_megatron.rewards.judge import judge_batch

    if ctx.judge is None:
        raise RewardConfigError("reward 'rm' needs a judge client: set rewards.rm.backend=openai "
                                "with rewards.rm.base_url and rewards.rm.model, or pass "
                                "RewardManager(config, judge=...)")
    # a chat prompt record holds ``messages`` instead of ``prompt``
    prompts = [{"prompt": s.get("prompt", s.get("messages"))} if "prompt" in s or "messages" in s else {}
               for s in samples]
    missing = _missing(prompts, "prompt", "rm", ctx)
    todo = [i for i, m in enumerate(missing) if not m]
    verdicts = judge_batch(ctx.judge, [_prompt_text(prompts[i]["prompt"]) for i in todo],
                           [responses[i] for i in todo],
                           [str(samples[i].get("answer", "")) for i in todo],
                           template=ctx.config.rm.prompt_template)
    scores = [math.nan] * len(responses)
    for i, v in zip(todo, verdicts):
        if v.request_failed:
            ctx.count("rm", "request_failures")
        else:
            scores[i] = v.score
            if v.reason:
                ctx.count("rm", "parse_failures")
    return scores


REGISTRY: dict[str, RewardFn] = {"math": math_reward, "code": code_reward, "rm": rm_reward}
"""Built-in rewards by name. Add entries here, or name ``package.module:function`` in config."""


def resolve(name: str) -> RewardFn:
    """The reward function registered as ``name``, or imported from ``package.module:function``."""
    if name in REGISTRY:
        return REGISTRY[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown reward {name!r}: use one of {sorted(REGISTRY)} or "
                         "'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {name!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


def _prompt_text(prompt: Any) -> str:
    """The judge's view of a prompt: the text, or a chat prompt's non-system turns one per line,
    a turn's text parts joined and its image parts written ``<image>``."""
    if isinstance(prompt, str):
        return prompt
    lines = []
    for message in prompt:
        if message.get("role") == "system":
            continue
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join("<image>" if isinstance(p, dict) and p.get("type") == "image"
                              else str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
        lines.append(str(content))
    return "\n".join(lines)


class RewardManager:
    """Scores batches with the rewards their samples select and keeps metrics."""

    def __init__(self, config: RewardsConfig, *, judge: Any = None):
        errors = config.validate()
        if errors:
            raise ValueError("invalid rewards config:\n  " + "\n  ".join(errors))
        self.config = config
        self.ctx = RewardContext(config, judge)
        self._stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def _ensure_judge(self) -> None:
        if self.ctx.judge is None and self.config.rm.backend == "openai":
            from k15_megatron.rewards.judge import OpenAIJudge

            self.ctx.judge = OpenAIJudge.from_config(self.config.rm)

    def spec_for(self, sample: Mapping[str, Any]) -> dict[str, float]:
        """``{reward name: weight}`` for one sample (see module docstring)."""
        spec = sample.get("reward")
        if isinstance(spec, Mapping):
            return {str(k): float(v) for k, v in spec.items()}
        if spec:
            return parse_reward_spec(str(spec))
        source = sample.get("data_source")
        if source is not None and source in self.config.sources:
            return parse_reward_spec(self.config.sources[source])
        return parse_reward_spec(self.config.default)

    def score(self, responses: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[float]:
        """Combined reward in [0, 1] for every response (weighted mean of its rewards)."""
        if len(responses) != len(samples):
            raise ValueError(f"RewardManager.score: {len(responses)} responses but "
                             f"{len(samples)} samples")
        specs = [self.spec_for(s) for s in samples]
        by_name: dict[str, list[int]] = defaultdict(list)
        for i, spec in enumerate(specs):
            for name in spec:
                by_name[name].append(i)
        values: dict[tuple[int, str], float] = {}
        for name, indices in by_name.items():
            scores = self._call(name, [responses[i] for i in indices],
                                [samples[i] for i in indices])
            values.update({(i, name): v for i, v in zip(indices, scores)})
        combined = []
        for i, spec in enumerate(specs):
            total = sum(spec.values())
            combined.append(sum(w * values[(i, n)] for n, w in spec.items()) / total)
        return combined

    def _call(self, name: str, responses: list[str], samples: list) -> list[float]:
        stats = self._stats[name]
        fn = resolve(name)  # an unknown name is a config/data error: raise, naming it
        if name == "rm":
            self._ensure_judge()
        start = time.perf_counter()
        raw = self._run(name, fn, responses, samples)
        stats["latency_s"] += time.perf_counter() - start
        scores = []
        for value in raw:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                and 0.0 <= value <= 1.0
            stats["failures"] += 0 if ok else 1
            scores.append(float(value) if ok else 0.0)
        stats["calls"] += 1
        stats["items"] += len(scores)
        stats["sum"] += sum(scores)
        return scores

    def _run(self, name: str, fn: RewardFn, responses: list[str], samples: list) -> list:
        """``fn`` on the batch; if it raises, on each item alone (NaN where it raises again)."""
        try:
            return _checked(fn, responses, samples, self.ctx)
        except (SandboxError, RewardConfigError):
            raise
        except Exception as err:  # noqa: BLE001 (a custom reward may raise anything)
            if len(responses) == 1:
                logger.exception("reward %r failed on one item; scoring it 0", name)
                return [math.nan]
            logger.warning("reward %r failed on a batch of %d (%s: %s); scoring it item by item",
                           name, len(responses), type(err).__name__, err)
            self.ctx.count(name, "batch_retries")
        values = []
        for response, sample in zip(responses, samples):
            try:
                values += _checked(fn, [response], [sample], self.ctx)
            except (SandboxError, RewardConfigError):
                raise
            except Exception:  # noqa: BLE001
                logger.exception("reward %r failed on one item; scoring it 0", name)
                values.append(math.nan)
        return values

    def metrics(self, *, reset: bool = True) -> dict[str, float]:
        """``rewards/<name>/{calls,items,failures,latency_s,latency_per_call_s,mean}`` plus
        reported events,
        accumulated since the last reset."""
        out: dict[str, float] = {}
        for name, stats in self._stats.items():
            for key in ("calls", "items", "failures", "latency_s"):
                out[f"rewards/{name}/{key}"] = float(stats[key])
            out[f"rewards/{name}/latency_per_call_s"] = (stats["latency_s"] / stats["calls"]
                                                         if stats["calls"] else 0.0)
            out[f"rewards/{name}/mean"] = stats["sum"] / stats["items"] if stats["items"] else 0.0
        out.update(self.ctx.events)
        if reset:
            self._stats.clear()
            self.ctx.events.clear()
        return out


def _checked(fn: RewardFn, responses: list[str], samples: list, ctx: RewardContext) -> list:
    raw = list(fn(responses, samples, ctx))
    if len(raw) != len(responses):
        raise ValueError(f"returned {len(raw)} values for {len(responses)} responses")
    return raw
