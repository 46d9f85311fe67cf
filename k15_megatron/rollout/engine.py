"""RolloutEngine: a thin wrapper around vLLM's offline ``LLM`` that generates response segments.

One call generates one segment for each request: a request is a trajectory id, its prompt,
the response tokens of earlier segments (partial rollouts, PAPER.md section 4) and a token
allowance; the result is the new tokens, the behaviour log-prob of each, and why the segment
ended:

* ``stop``: the model emitted EOS (or a stop token); the EOS token is part of the segment.
* ``budget``: the per-iteration token budget ran out; the trajectory continues next call.
* ``repeat``: the response repeats (``rl.repeat``); it is cut at the token where the thresholds
  were first met, during generation (see :mod:`k15_megatron.rollout.repeat_stop`).
* ``max_length``: the response reached ``rollout.max_response_tokens``.

Image prompts (Qwen2-VL / Qwen2.5-VL): a request carries its prompt's decoded images
(``SegmentRequest.images``) and its prompt tokens with each image's placeholder EXPANDED, as the
family's processor writes them and the trainer reads them; every segment of the trajectory,
continuations included, is generated with the same images (vLLM gets prompt + earlier segments
+ images). vLLM 0.32 expands image placeholders itself, so each run of image tokens is cut to
one before the request is sent and vLLM's expansion is checked against the request's tokens
(:mod:`k15_megatron.rollout.images` has the details and sources). Responses never contain the
image / video pad tokens (a logit bias of -100 bans them; see ``VisionTokens.unsampled``).

Behaviour log-probs come from vLLM (``logprobs=0`` returns the sampled token's log-prob);
``rollout.logprobs_mode`` chooses raw (the model at temperature 1) or processed (the
distribution actually sampled from, after temperature/top-k/top-p) values.

Building the engine (SPMD inside the training processes, CPU specifics) is
:mod:`k15_megatron.rollout.build`; the weight sync reaches the workers through ``.llm``
(``llm.collective_rpc``) and must call ``mark_weights_updated`` afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from k15_megatron.config.rl import RepeatConfig
from k15_megatron.config.rollout import RolloutConfig
from k15_megatron.parallel.device import HAVE_CUDA
from k15_megatron.rollout.build import EngineLayout, build_llm, engine_layout
from k15_megatron.rollout.images import (check_expansion, image_placeholder, process_images, synthetic_image,
                                         vision_tokens_of, vllm_image_prompt)
from k15_megatron.rollout.repeat_stop import REPEAT_STOP_PROCESSOR, repeat_cut, repeat_stop_args

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "budget", "repeat", "max_length")
_SEED_MOD = 2**31 - 1


@dataclass(frozen=True)
class SegmentRequest:
    """Generate the next segment of one trajectory."""

    trajectory_id: int
    prompt_tokens: torch.Tensor
    """[P] int64 prompt token ids."""
    response_tokens: torch.Tensor
    """[R] int64 tokens of the trajectory's earlier segments (R = 0 for a new trajectory)."""
    token_budget: int
    """Most tokens this call may add (the per-iteration budget, rl.replay.segment_token_budget)."""
    max_response_tokens: int
    """Longest response over all segments (rollout.max_response_tokens)."""
    images: tuple = ()
    """The prompt's images as decoded PIL images, one per run of image tokens in
    ``prompt_tokens`` (each placeholder expanded to the image's merged token count), in order;
    () for a text prompt. Continuations of the trajectory carry the same images."""

    @property
    def max_new_tokens(self) -> int:
        """min(token budget, tokens left before the response cap)."""
        return min(self.token_budget, self.max_response_tokens - self.response_tokens.numel())


@dataclass
class SegmentResult:
    """One generated segment."""

    trajectory_id: int
    tokens: torch.Tensor
    """[n] int64 new token ids."""
    logprobs: torch.Tensor
    """[n] float32 behaviour log-prob of each new token (see rollout.logprobs_mode)."""
    finish_reason: str
    """One of FINISH_REASONS; 'budget' = unfinished, continue in a later call."""
    generated_tokens: int
    """Tokens the engine produced for this segment, including those a repeat cut dropped
    (the compute spent; equals len(tokens) unless the reason is 'repeat')."""

    @property
    def finished(self) -> bool:
        return self.finish_reason != "budget"


@dataclass
class CheckSample:
    """One sequence of the post-sync log-prob check (:meth:`RolloutEngine.sample_for_check`)."""

    prompt: list[int]
    """Prompt token ids (image placeholders expanded)."""
    result: SegmentResult
    images: Optional[dict]
    """None for a text prompt, else the image inputs of the trainer's model:
    ``{"pixel_values": [patches, values], "image_grid_thw": [images, 3]}``."""


@dataclass(frozen=True)
class Sampling:
    """How one ``generate`` call samples. Build it with ``Sampling.from_config``."""

    temperature: float
    top_p: float
    top_k: int
    seed: Optional[int]
    """None: the engine's random stream. Else each request draws from its own stream seeded by
    (seed, trajectory id, tokens already generated): reproducible whatever the batch holds."""
    ignore_eos: bool
    """Generate past EOS (benchmarks and tests only; disables the in-engine repeat stop)."""

    @classmethod
    def from_config(cls, cfg: RolloutConfig, **overrides) -> "Sampling":
        base = cls(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=None,
                   ignore_eos=False)
        return replace(base, **overrides)


class RolloutEngine:
    """Generates response segments with a vLLM ``LLM`` (see the module doc)."""

    def __init__(self, llm, *, cfg: RolloutConfig, repeat: RepeatConfig,
                 layout: Optional[EngineLayout] = None):
        """Wrap an existing ``vllm.LLM`` (e.g. a test session's engine). Prefer ``create``.

        An LLM built without the repeat-stop processor still gives correct results: looping
        responses are cut afterwards at the same token, only the compute is not saved.
        """
        self.llm = llm
        self.cfg = cfg
        self.repeat = repeat
        self.layout = layout or engine_layout(cfg, world_size=1, rank=0)
        self.policy_version = 0
        self._asleep = False
        self.repeat_stop_installed = _has_repeat_stop(llm)
        if repeat.enabled and not self.repeat_stop_installed:
            log.warning("vLLM engine has no repeat-stop logits processor: repeating responses "
                        "are cut after generation instead of during it")
        model_config = llm.llm_engine.vllm_config.model_config
        self.max_model_len: int = model_config.max_model_len
        if model_config.logprobs_mode != cfg.logprobs_mode:
            raise ValueError(f"rollout.logprobs_mode={cfg.logprobs_mode!r} but the vLLM engine "
                             f"was built with {model_config.logprobs_mode!r}")
        self.model_path: str = model_config.model
        self.vision = vision_tokens_of(model_config.hf_config)
        """The vision special tokens of a vision-language model, None for a text model."""

    @classmethod
    def create(cls, cfg: RolloutConfig, *, model_path: str, repeat: RepeatConfig,
               seed: int) -> "RolloutEngine":
        """Build the engine of this process (SPMD: every rank calls this; see rollout.build)."""
        llm, layout = build_llm(cfg, model_path=model_path, seed=seed)
        return cls(llm, cfg=cfg, repeat=repeat, layout=layout)

    def mark_weights_updated(self, policy_version: int) -> None:
        """Call after every in-place weight update: records the version new segments are
        tagged with and drops cached prefix KV, which was computed with the old weights (the
        weight sync itself also drops cached image embeddings, engine/weight_sync.py)."""
        self.policy_version = int(policy_version)
        self.llm.reset_prefix_cache()

    def sampler_rng_state(self) -> dict:
        """The random stream vLLM's sampler draws from for requests without a seed of their own.

        The engine core runs in this process (see rollout.build), and vLLM 0.32's samplers draw
        from torch's default generators: on CPU, ``TopKTopPSampler.forward_cpu`` takes every
        step's Gumbel-noise seeds from the default CPU generator (``torch.randint``, one per
        batch row, seeded requests included); on GPU the noise comes from the current device's
        default CUDA generator (GPU: not run). Returns ``{"cpu": ByteTensor[, "cuda": ...]}``;
        a run checkpoint stores it so that a resumed run continues the same stream."""
        state = {"cpu": torch.get_rng_state()}
        if HAVE_CUDA:
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def set_sampler_rng_state(self, state: dict) -> None:
        """Restore a state returned by :meth:`sampler_rng_state` (same kind of device)."""
        torch.set_rng_state(state["cpu"])
        if HAVE_CUDA:
            if "cuda" not in state:
                raise ValueError("the saved sampler state has no CUDA generator state (saved on a "
                                 "machine without CUDA); it cannot resume the GPU sampler's stream")
            torch.cuda.set_rng_state(state["cuda"])

    def sleep(self, level: int = 1) -> None:
        """Free the engine's device memory while the trainer runs (GPU: vLLM sleep mode; level 1
        offloads weights and drops the KV cache, level 2 drops both). No-op on CPU, where vLLM has
        no sleep mode and the trainer does not compete for device memory."""
        if HAVE_CUDA and not self._asleep:
            self.llm.sleep(level=level)
            self._asleep = True

    def wake_up(self) -> None:
        """Undo :meth:`sleep` before generating (the weight sync follows). No-op on CPU."""
        if HAVE_CUDA and self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def sample_for_check(self, *, num_sequences: int, max_tokens: int, vocab_size: int,
                         seed: int = 1234) -> list[CheckSample]:
        """Sample ``num_sequences`` continuations of fixed pseudo-random prompts at temperature 1
        (for the post-sync log-prob check); every rank of a replica gets the same ones.

        Text model: 4 random token ids per prompt. Vision-language model: 2 random text tokens,
        one random image (:func:`k15_megatron.rollout.images.synthetic_image`, its placeholder
        expanded by the model folder's processor), 2 more text tokens; the text tokens are drawn
        below the smallest vision token id, so no stray placeholder appears."""
        generator = torch.Generator().manual_seed(seed)
        high = vocab_size if self.vision is None else min(vocab_size, self.vision.vision_start_token_id,
                                                           self.vision.image_token_id)
        prompts = [torch.randint(0, high, (4,), generator=generator) for _ in range(num_sequences)]
        images: list[Optional[dict]] = [None] * num_sequences
        pictures: list[tuple] = [()] * num_sequences
        if self.vision is not None:
            for i in range(num_sequences):
                pictures[i] = (synthetic_image(seed + i),)
                images[i] = process_images(self.model_path, pictures[i])
                placeholder = torch.tensor(image_placeholder(self.vision, images[i]["image_grid_thw"][0]))
                prompts[i] = torch.cat([prompts[i][:2], placeholder, prompts[i][2:]])
        requests = [SegmentRequest(trajectory_id=i, prompt_tokens=p, response_tokens=torch.zeros(0, dtype=torch.long),
                                   token_budget=max_tokens, max_response_tokens=max_tokens, images=pictures[i])
                    for i, p in enumerate(prompts)]
        sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, seed=seed, ignore_eos=True)
        results = self.generate(requests, sampling=sampling)
        return [CheckSample(prompt=p.tolist(), result=r, images=im) for p, r, im in zip(prompts, results, images)]

    def shutdown(self) -> None:
        """Release the engine (workers, KV cache) now instead of at interpreter exit.

        vLLM's teardown (``cleanup_dist_env_and_memory``, also run when the engine is garbage
        collected) destroys process-wide state: vLLM's parallel groups, which every other
        vLLM engine in this process needs (it fails afterwards with "... group is not
        initialized"), and torch.distributed's default process group, the one Megatron uses.
        So keep ONE engine per process for the whole run and shut it down after the last
        collective."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, requests: Sequence[SegmentRequest], *, sampling: Sampling,
                 on_finished: Optional[Callable[[SegmentResult], None]] = None) -> list[SegmentResult]:
        """One segment per request, in request order (all requests in one vLLM batch).

        ``on_finished(result)`` is called for each segment as soon as vLLM finishes it, in
        finishing order, while the others are still generated (the RL loop scores finished
        groups there, :mod:`k15_megatron.jobs.reward_overlap`); it runs on the calling thread
        between engine steps, so it must return quickly. Under a multi-rank engine every rank
        of one replica must pass the same requests.
        """
        if not requests:
            return []
        from vllm import SamplingParams

        params, prompts, sizes = [], [], []
        for req in requests:
            self._check(req)
            prefix = req.response_tokens.tolist()
            prompts.append(vllm_image_prompt(req.prompt_tokens.tolist(), prefix, req.images, vision=self.vision,
                                             trajectory_id=req.trajectory_id))
            sizes.append(req.prompt_tokens.numel() + len(prefix))  # what vLLM schedules (images expanded)
            extra = None
            if self.repeat.enabled and self.repeat_stop_installed and not sampling.ignore_eos:
                extra = repeat_stop_args(self.repeat, prefix_len=len(prefix),
                                         check_interval=self.cfg.repeat_check_interval)
            params.append(SamplingParams(
                n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k, max_tokens=req.max_new_tokens, ignore_eos=sampling.ignore_eos,
                seed=_request_seed(sampling.seed, req), logprobs=0, flat_logprobs=True,
                detokenize=False, extra_args=extra, logit_bias=self._banned_token_bias()))
        results: list[Optional[SegmentResult]] = [None] * len(requests)
        for wave in self._waves(sizes, seeded=sampling.seed is not None):
            ids = self.llm.enqueue([prompts[i] for i in wave], [params[i] for i in wave], use_tqdm=False)
            index_of = {_external_request_id(rid): i for rid, i in zip(ids, wave)}
            for out in self._finished_outputs():
                i = index_of.get(out.request_id)
                if i is None:
                    raise RuntimeError(f"vLLM finished request {out.request_id!r}, which this call did not "
                                       f"enqueue (ids {sorted(index_of)[:4]}...)")
                req = requests[i]
                if req.images:
                    check_expansion(req.prompt_tokens.tolist() + req.response_tokens.tolist(),
                                    out.prompt_token_ids, trajectory_id=req.trajectory_id)
                results[i] = self._result(req, out)
                if on_finished is not None:
                    on_finished(results[i])
        return results

    def _finished_outputs(self):
        """Step vLLM's engine until the enqueued requests are done, yielding each finished
        ``RequestOutput`` as it comes (what ``LLM.generate`` does, without waiting for all)."""
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    yield out

    def _banned_token_bias(self) -> Optional[dict]:
        """vLLM's ``logit_bias`` that keeps image / video pad tokens out of responses (None for a
        text model). -100 is vLLM's smallest bias. The sampled tokens' raw log-probs
        (``rollout.logprobs_mode=raw_logprobs``) are computed before any logits processing,
        so the ban does not change them; processed log-probs include it."""
        if self.vision is None:
            return None
        return {token: -100.0 for token in self.vision.unsampled}

    def _waves(self, sizes: list[int], *, seeded: bool) -> list[range]:
        """Consecutive groups of requests to submit together: all at once, except seeded sampling
        on CPU. There vLLM (0.32) crashes ("CPU Generator does not use offset") when the scheduler
        splits a seeded request's prefill over steps (chunked prefill): it rewinds the request's
        generator, which CPU generators cannot do. So each wave's prefill tokens must fit one
        scheduler step (``max_num_batched_tokens``); with per-request seeds the tokens drawn do
        not depend on which requests share a batch, so the results are the same."""
        if not seeded or HAVE_CUDA:
            return [range(len(sizes))]
        budget = self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        waves, start, used = [], 0, 0
        for i, size in enumerate(sizes):
            if size > budget:
                raise ValueError(f"a {size}-token prompt (with its earlier segments) exceeds the engine's "
                                 f"max_num_batched_tokens={budget}: seeded sampling (deterministic=true) on "
                                 "CPU needs rollout.max_num_batched_tokens >= the longest prompt + response")
            if used + size > budget:
                waves.append(range(start, i))
                start, used = i, 0
            used += size
        waves.append(range(start, len(sizes)))
        return waves

    def _check(self, req: SegmentRequest) -> None:
        if req.prompt_tokens.dim() != 1 or req.response_tokens.dim() != 1:
            raise ValueError(f"trajectory {req.trajectory_id}: prompt_tokens and response_tokens "
                             "must be 1-D token id tensors")
        if req.max_new_tokens < 1:
            raise ValueError(f"trajectory {req.trajectory_id}: nothing left to generate (budget "
                             f"{req.token_budget}, {req.response_tokens.numel()} of "
                             f"{req.max_response_tokens} response tokens used)")
        total = req.prompt_tokens.numel() + req.response_tokens.numel() + req.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"trajectory {req.trajectory_id}: prompt ({req.prompt_tokens.numel()}) + response "
                f"({req.response_tokens.numel()}) + new ({req.max_new_tokens}) tokens exceed the "
                f"engine's max_model_len={self.max_model_len}; raise rollout.max_model_len or "
                "shorten the prompt")

    def _result(self, req: SegmentRequest, out) -> SegmentResult:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        generated = len(tokens)
        logprobs = _sampled_logprobs(completion.logprobs, tokens, req.trajectory_id)
        if completion.finish_reason == "stop":
            reason = "stop"
        elif completion.finish_reason == "length":
            at_cap = req.response_tokens.numel() + len(tokens) >= req.max_response_tokens
            reason = "max_length" if at_cap else "budget"
        else:
            raise RuntimeError(f"trajectory {req.trajectory_id}: vLLM ended the request with "
                               f"{completion.finish_reason!r}")
        if self.repeat.enabled:
            keep = repeat_cut(self.repeat, req.response_tokens.tolist(), tokens)
            if keep is not None:
                # With the processor active vLLM stopped about one check interval past the cut
                # (tests/rollout pin the bound); without it, at the budget. Either way the
                # response ends where the thresholds were first met.
                tokens, logprobs, reason = tokens[:keep], logprobs[:keep], "repeat"
        return SegmentResult(trajectory_id=req.trajectory_id,
                             tokens=torch.tensor(tokens, dtype=torch.long),
                             logprobs=torch.tensor(logprobs, dtype=torch.float32),
                             finish_reason=reason, generated_tokens=generated)


def _external_request_id(internal: str) -> str:
    """The id a ``RequestOutput`` carries for a request ``LLM.enqueue`` returned as
    ``internal``: vLLM 0.32 appends ``-`` and 8 random characters to the caller's id
    (``InputProcessor.assign_request_id``) and reports the caller's id in outputs."""
    return internal.rsplit("-", 1)[0]


def _has_repeat_stop(llm) -> bool:
    registered = llm.llm_engine.vllm_config.model_config.logits_processors or ()
    names = {p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}" for p in registered}
    return REPEAT_STOP_PROCESSOR in names


def _request_seed(seed: Optional[int], req: SegmentRequest) -> Optional[int]:
    if seed is None:
        return None
    return hash((seed, req.trajectory_id, req.response_tokens.numel())) % _SEED_MOD


def _sampled_logprobs(flat, tokens: list[int], trajectory_id: int) -> list[float]:
    """The sampled token's log-prob at each position of vLLM's FlatLogprobs (logprobs=0 puts
    exactly the sampled token at each position's first slot)."""
    if flat is None or len(flat.start_indices) != len(tokens):
        raise RuntimeError(f"trajectory {trajectory_id}: vLLM returned no per-token log-probs")
    starts = flat.start_indices
    if any(flat.token_ids[s] != t for s, t in zip(starts, tokens)):
        raise RuntimeError(f"trajectory {trajectory_id}: vLLM log-probs are not those of the "
                           "sampled tokens")
    return [flat.logprobs[s] for s in starts]
