"""Chain-of-thought reward model: a generative judge that reasons, then emits a JSON verdict.

In a job it is the ``rm`` reward of `k15_megatron.rewards.registry`, configured by
``rewards.rm.*`` (backend ``openai``: any OpenAI-compatible endpoint, e.g. a local
``vllm serve``).

PAPER.md section 6: the report's CoT reward model (reason step by step, then a JSON verdict)
spot-checked at 98.5% against 84.4% for a classic value-head model. This module holds the three
parts of such a judge, none of which depends on a particular model:

- the prompt (`DEFAULT_TEMPLATE`, or any template with ``{question}``, ``{reference}`` and
  ``{response}`` fields; substitution is single-pass, so braces inside a response are inert);
- the verdict parser `parse_verdict`: the LAST JSON object in the judge's text counts
  (reasoning may quote JSON before it); ``"correct": true/false`` gives 1/0, otherwise a numeric
  ``"score"`` in [0, 1]. Anything else (no JSON, malformed JSON, missing or out-of-range fields)
  scores 0 with a reason — never an exception;
- clients: `VLLMJudge` wraps any object with vLLM's offline ``LLM.generate(prompts,
  sampling_params)`` API (the rollout engine itself, so no second model is loaded), and
  `OpenAIJudge` talks to an OpenAI-compatible ``/chat/completions`` endpoint (``vllm serve``,
  SGLang, a hosted API) with the standard library only. vLLM itself is not imported here
  (``rewards/`` stays free of the inference engine): the caller passes the sampling-params
  object it built.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

from k15_megatron.config.rewards import RewardModelConfig

DEFAULT_TEMPLATE = """You are a careful grader. Decide whether the final answer of the response \
below solves the problem. Work through the problem and the response step by step; compare the \
final answer with the reference answer when one is given (equivalent forms count as correct).
After your reasoning, end with a JSON object on its own line, exactly in this form:
{"correct": true, "score": 1.0}   or   {"correct": false, "score": 0.0}

## Problem
{question}

## Reference answer
{reference}

## Response
{response}

## Your reasoning, then the JSON verdict
"""

_FIELD = re.compile(r"\{(question|reference|response)\}")
_MAX_OBJECTS_TRIED = 256


@dataclass
class JudgeVerdict:
    """``score`` in [0, 1]; ``reason`` is "" for a well-formed verdict, else why it is 0;
    ``verdict`` is the parsed JSON object (None if none was found)."""

    score: float
    reason: str = ""
    verdict: Optional[dict] = None
    request_failed: bool = False
    """The judge gave no text (request error or timeout): not a verdict at all."""


def render_prompt(question: str, response: str, reference: str = "", *,
                  template: str = "") -> str:
    """The judge prompt: ``template`` (default `DEFAULT_TEMPLATE`) with its fields filled."""
    values = {"question": question, "reference": reference or "(none given)",
              "response": response}
    return _FIELD.sub(lambda m: values[m.group(1)], template or DEFAULT_TEMPLATE)


def last_json_object(text: str) -> Optional[dict]:
    """The JSON object that ends last in ``text`` (the outermost one if several end there).

    Tries the last ``_MAX_OBJECTS_TRIED`` opening braces only, so an adversarial text full of
    braces costs bounded time.
    """
    decoder = json.JSONDecoder()
    best: Optional[tuple[int, dict]] = None
    starts = [i for i, ch in enumerate(text) if ch == "{"][-_MAX_OBJECTS_TRIED:]
    for start in reversed(starts):
        try:
            obj, end = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(obj, dict) and (best is None or end >= best[0]):
            best = (end, obj)
    return None if best is None else best[1]


def parse_verdict(text: Optional[str]) -> JudgeVerdict:
    """Score of one judge output (see module docstring). Never raises."""
    if not text or not text.strip():
        return JudgeVerdict(0.0, "empty judge output")
    obj = last_json_object(text)
    if obj is None:
        return JudgeVerdict(0.0, "no JSON object in judge output")
    if "correct" in obj:
        correct = obj["correct"]
        if isinstance(correct, str) and correct.strip().lower() in ("true", "false"):
            correct = correct.strip().lower() == "true"
        if not isinstance(correct, bool):
            return JudgeVerdict(0.0, f"'correct' is not a boolean: {correct!r}"[:200], obj)
        return JudgeVerdict(1.0 if correct else 0.0, "", obj)
    if "score" in obj:
        score = obj["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            return JudgeVerdict(0.0, f"'score' is not a number: {score!r}"[:200], obj)
        if not 0.0 <= float(score) <= 1.0:
            return JudgeVerdict(0.0, f"'score' {score} outside [0, 1]", obj)
        return JudgeVerdict(float(score), "", obj)
    return JudgeVerdict(0.0, "verdict JSON has neither 'correct' nor 'score'", obj)


@dataclass
class JudgeReply:
    """Raw text of one judge completion, or None with ``error`` when the request failed."""

    text: Optional[str]
    error: str = ""


class JudgeClient(Protocol):
    """Anything that turns judge prompts into completions, one reply per prompt, in order."""

    def complete(self, prompts: Sequence[str]) -> list[JudgeReply]:
        ...


class VLLMJudge:
    """Judge on a vLLM engine (or any object with the same ``generate`` API).

    Prompts go in one batched ``generate`` call; if the engine rejects the batch (a prompt
    longer than its context, say), each prompt is retried alone and only the rejected ones get
    a reply with ``error``. ``sampling_params``: a ``vllm.SamplingParams`` built by the caller
    (max_tokens, temperature from `RewardModelConfig`). ``chat``: wrap each prompt as one user
    message with the engine tokenizer's chat template (for instruction-tuned judges).
    """

    def __init__(self, llm: Any, sampling_params: Any, *, chat: bool = False):
        self.llm, self.sampling_params, self.chat = llm, sampling_params, chat

    def complete(self, prompts: Sequence[str]) -> list[JudgeReply]:
        """One `JudgeReply` per prompt, from one batched ``generate`` call."""
        if self.chat:
            tokenizer = self.llm.get_tokenizer()
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                     tokenize=False, add_generation_prompt=True)
                       for p in prompts]
        try:
            return [self._reply(out) for out in self._generate(list(prompts))]
        except Exception:  # one bad prompt (e.g. longer than the context) fails the batch:
            pass           # retry one by one so only that prompt scores 0
        replies = []
        for prompt in prompts:
            try:
                replies.append(self._reply(self._generate([prompt])[0]))
            except Exception as err:
                replies.append(JudgeReply(None, f"judge engine rejected the prompt: {err}"[:500]))
        return replies

    def _generate(self, prompts: list[str]) -> list:
        return self.llm.generate(prompts, self.sampling_params, use_tqdm=False)

    @staticmethod
    def _reply(output: Any) -> JudgeReply:
        if not output.outputs:
            return JudgeReply(None, "no completion returned")
        return JudgeReply(output.outputs[0].text)


class OpenAIJudge:
    """Judge behind an OpenAI-compatible HTTP endpoint (``POST {base_url}/chat/completions``).

    Requests run ``max_concurrency`` at a time; a failed or timed-out request yields a reply
    with ``error`` set (the item then scores 0), never an exception.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str = "", max_tokens: int = 1024,
                 temperature: float = 0.0, timeout_s: float = 120.0, max_concurrency: int = 8):
        if not base_url:
            raise ValueError("OpenAIJudge: base_url is empty (rewards.rm.base_url)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.max_tokens, self.temperature = max_tokens, temperature
        self.timeout_s, self.max_concurrency = timeout_s, max_concurrency

    @classmethod
    def from_config(cls, cfg: RewardModelConfig) -> "OpenAIJudge":
        """Client for ``rewards.rm``; the key is read from the variable ``cfg.api_key_env``."""
        api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        return cls(cfg.base_url, cfg.model, api_key=api_key, max_tokens=cfg.max_tokens,
                   temperature=cfg.temperature, timeout_s=cfg.request_timeout_s,
                   max_concurrency=cfg.max_concurrency)

    def _one(self, prompt: str) -> JudgeReply:
        body = json.dumps({"model": self.model, "max_tokens": self.max_tokens,
                           "temperature": self.temperature,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                payload = json.loads(resp.read())
            content = payload["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as err:
            return JudgeReply(None, f"HTTP {err.code} from {self.url}")
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            return JudgeReply(None, f"request to {self.url} failed: {err}")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            return JudgeReply(None, f"malformed response from {self.url}: {err!r}"[:300])
        if not isinstance(content, str):
            return JudgeReply(None, f"malformed response from {self.url}: content {content!r}")
        return JudgeReply(content)

    def complete(self, prompts: Sequence[str]) -> list[JudgeReply]:
        """One `JudgeReply` per prompt, in order."""
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(self._one, prompts))


def judge_batch(client: JudgeClient, questions: Sequence[str], responses: Sequence[str],
                references: Optional[Sequence[str]] = None, *,
                template: str = "") -> list[JudgeVerdict]:
    """Render, query and parse: one `JudgeVerdict` per response (failed requests score 0)."""
    if len(questions) != len(responses):
        raise ValueError(f"judge_batch: {len(questions)} questions but {len(responses)} responses")
    refs = list(references) if references is not None else [""] * len(questions)
    prompts = [render_prompt(q, r, ref, template=template)
               for q, r, ref in zip(questions, responses, refs)]
    replies = client.complete(prompts)
    if len(replies) != len(prompts):
        raise RuntimeError(f"judge client returned {len(replies)} replies for {len(prompts)} "
                           "prompts")
    return [parse_verdict(reply.text) if reply.text is not None
            else JudgeVerdict(0.0, reply.error or "request failed", request_failed=True)
            for reply in replies]
