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

`RewardManager.metrics()` reports per reward name: calls, items, failures (a raising function
or a value outside [0, 1]: those items score 0), total latency in seconds, mean reward, plus
event counters the rewards themselves add (math timeouts, code worker failures, judge parse
failures). A sandbox that cannot run at all (`SandboxError`) is not swallowed: it raises.
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


def math_reward(responses: Sequence[str], samples: Sequence[Mapping[str, Any]],
                ctx: RewardContext) -> list[float]:
    """Rule-based answer checking against ``sample["answer"]`` (`rewards.math`)."""
    from k15_megatron.rewards.math import get_scorer

    golds = [str(_need(s, "answer", "math")) for s in samples]
    results = get_scorer(ctx.config.math).check_batch(responses, golds)
    for r in results:
        if r.reason.startswith("timeout"):
            ctx.count("math", "timeouts")
        elif r.reason and not r.reason.startswith(("no ", "empty")):
            ctx.count("math", "rejected_inputs")
    return [r.score for r in results]


def code_reward(responses: Sequence[str], samples: Sequence[Mapping[str, Any]],
                ctx: RewardContext) -> list[float]:
    """Sandboxed tests ``sample["tests"]`` on the response's last fenced code block."""
    from k15_megatron.rewards.code import extract_code, run_tests_batch

    scores = [0.0] * len(responses)
    todo = []
    for i, (response, sample) in enumerate(zip(responses, samples)):
        program = extract_code(response)
        if program is None:
            ctx.count("code", "no_code_block")
        else:
            todo.append((i, program, list(_need(sample, "tests", "code")),
                         sample.get("language", "python")))
    if todo:
        results = run_tests_batch([t[1] for t in todo], [t[2] for t in todo],
                                  [t[3] for t in todo], config=ctx.config.code)
        for (i, *_), result in zip(todo, results):
            scores[i] = result.reward
            if result.error:
                ctx.count("code", "program_errors")
    return scores


def rm_reward(responses: Sequence[str], samples: Sequence[Mapping[str, Any]],
              ctx: RewardContext) -> list[float]:
    """Chain-of-thought reward model (`rewards.judge`); needs ``ctx.judge``."""
    from k15_megatron.rewards.judge import judge_batch

    if ctx.judge is None:
        raise ValueError("reward 'rm' needs a judge client: RewardManager(config, judge=...)")
    questions = [_prompt_text(_need(s, "prompt", "rm")) for s in samples]
    references = [str(s.get("answer", "")) for s in samples]
    verdicts = judge_batch(ctx.judge, questions, responses, references,
                           template=ctx.config.rm.prompt_template)
    for v in verdicts:
        if v.reason:
            ctx.count("rm", "parse_failures")
    return [v.score for v in verdicts]


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


def _need(sample: Mapping[str, Any], key: str, reward: str) -> Any:
    if key not in sample:
        raise ValueError(f"reward {reward!r} needs sample[{key!r}]; sample has {sorted(sample)}")
    return sample[key]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if m.get("role") != "system")


class RewardManager:
    """Scores batches with the rewards their samples select and keeps metrics."""

    def __init__(self, config: RewardsConfig, *, judge: Any = None):
        errors = config.validate()
        if errors:
            raise ValueError("invalid rewards config:\n  " + "\n  ".join(errors))
        self.config = config
        self.ctx = RewardContext(config, judge)
        self._stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

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
        start = time.perf_counter()
        try:
            raw = list(fn(responses, samples, self.ctx))
            if len(raw) != len(responses):
                raise ValueError(f"returned {len(raw)} values for {len(responses)} responses")
        except SandboxError:
            raise
        except Exception:
            logger.exception("reward %r failed on a batch of %d; scoring it 0", name,
                             len(responses))
            raw = [math.nan] * len(responses)
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

    def metrics(self, *, reset: bool = True) -> dict[str, float]:
        """``rewards/<name>/{calls,items,failures,latency_s,mean}`` plus reported events,
        accumulated since the last reset."""
        out: dict[str, float] = {}
        for name, stats in self._stats.items():
            for key in ("calls", "items", "failures", "latency_s"):
                out[f"rewards/{name}/{key}"] = float(stats[key])
            out[f"rewards/{name}/mean"] = stats["sum"] / stats["items"] if stats["items"] else 0.0
        out.update(self.ctx.events)
        if reset:
            self._stats.clear()
            self.ctx.events.clear()
        return out
