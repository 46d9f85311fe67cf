"""Prompt sampling (PAPER.md section 3): uniform, prioritised by 1 - s_i, and curriculum.

Weight rules are plain functions in the ``WEIGHT_RULES`` registry, keyed by
``rl.sampling.strategy``; each maps (success rates, difficulty labels, iteration, config) to
non-negative per-problem weights:

- uniform: 1 for every problem.
- prioritized: (1 - s_i) + priority_floor. s_i is the problem's tracked success rate; a problem
  never attempted gets s_i = ``unseen_success_rate`` (default 0.0: optimistic, so every new
  problem is tried early with the highest priority).
- curriculum (the report's ablation): uniform over all problems before
  ``curriculum_switch_iteration``, then uniform over the hard ones only. Labels come with the
  data on any scale (the arithmetic task's integer step counts 1..5, a model's pass rate, ...);
  they are min-max normalised over the prompt set, (label - min) / (max - min) in [0, 1], and a
  problem is hard when its normalised difficulty is >= ``curriculum_hard_threshold`` (default
  0.5: labels 1..5 make 3, 4 and 5 hard). Labels that are all equal cannot separate easy from
  hard and are refused.

Rules for degenerate cases (documented so runs never stop on them): if every weight is 0 (all
tracked problems solved, no floor) the draw is uniform over the problems the rule allows (all of
them for prioritized); without replacement, if fewer problems have positive weight than prompts
are requested, all positive ones are taken and the rest is drawn uniformly from the others.

Success rates are tracked per problem from every scored response: a running mean over all
attempts, or an EMA over update calls (s <- d * s + (1 - d) * mean of this call's outcomes; the
first observation sets s directly). ``state_dict`` holds the statistics and the random generator,
so a restored sampler continues with exactly the draws an uninterrupted one would make.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from k15_megatron.config.rl import SAMPLING_STRATEGIES, SUCCESS_TRACKING, SamplingConfig

WeightRule = Callable[[torch.Tensor, Optional[torch.Tensor], int, SamplingConfig], torch.Tensor]


def uniform_weights(success_rates, difficulties, iteration, cfg):
    """Equal weight for every problem."""
    return torch.ones_like(success_rates)


def prioritized_weights(success_rates, difficulties, iteration, cfg):
    """(1 - s_i) + priority_floor, clamped at 0 (s_i in [0, 1])."""
    return (1.0 - success_rates).clamp(min=0.0) + cfg.priority_floor


def normalized_difficulties(labels: torch.Tensor) -> torch.Tensor:
    """[N] labels -> [N] float64 in [0, 1]: (label - min) / (max - min). ValueError when every
    label is the same (no problem is harder than another)."""
    labels = labels.double()
    low, high = labels.min(), labels.max()
    if not high > low:
        raise ValueError(f"rl.sampling.strategy=curriculum: every difficulty label is {float(low):g}, "
                         "so no problem is harder than another; give the prompts at least two "
                         "difficulty levels or use another rl.sampling.strategy")
    return (labels - low) / (high - low)


def curriculum_weights(success_rates, difficulties, iteration, cfg):
    """1 for all problems before the switch iteration; afterwards 1 only for hard problems
    (``difficulties`` normalised to [0, 1], see :func:`normalized_difficulties`)."""
    if difficulties is None:
        raise ValueError("rl.sampling.strategy=curriculum needs a difficulty label per problem")
    if iteration < cfg.curriculum_switch_iteration:
        return torch.ones_like(success_rates)
    return (difficulties >= cfg.curriculum_hard_threshold).to(success_rates.dtype)


WEIGHT_RULES: dict[str, WeightRule] = {
    "uniform": uniform_weights,
    "prioritized": prioritized_weights,
    "curriculum": curriculum_weights,
}
assert set(WEIGHT_RULES) == set(SAMPLING_STRATEGIES)


class PromptSampler:
    """Draws problem indices each iteration and tracks per-problem success rates.

    Args:
        num_problems: N, problems are indexed 0..N-1.
        cfg: the ``rl.sampling`` section.
        difficulties: optional [N] labels on any scale (needed by the curriculum strategy,
            which normalises them to [0, 1]; see :func:`normalized_difficulties`).
        seed: seed of the sampler's own torch.Generator.
    """

    def __init__(self, num_problems: int, cfg: SamplingConfig, *,
                 difficulties: Optional[torch.Tensor] = None, seed: int = 0):
        if num_problems < 1:
            raise ValueError(f"num_problems must be >= 1, got {num_problems}")
        if cfg.strategy not in WEIGHT_RULES:
            raise ValueError(f"rl.sampling.strategy must be one of {sorted(WEIGHT_RULES)}, "
                             f"got {cfg.strategy!r}")
        if cfg.success_tracking not in SUCCESS_TRACKING:
            raise ValueError(f"rl.sampling.success_tracking must be one of {SUCCESS_TRACKING}")
        if difficulties is not None and difficulties.shape != (num_problems,):
            raise ValueError(f"difficulties must have shape ({num_problems},), "
                             f"got {tuple(difficulties.shape)}")
        if cfg.strategy == "curriculum" and difficulties is None:
            raise ValueError("rl.sampling.strategy=curriculum needs difficulty labels")
        self.cfg = cfg
        self.num_problems = num_problems
        self.difficulties = None
        if difficulties is not None:
            self.difficulties = (normalized_difficulties(difficulties) if cfg.strategy == "curriculum"
                                 else difficulties.double())
        self.attempts = torch.zeros(num_problems, dtype=torch.float64)
        self.successes = torch.zeros(num_problems, dtype=torch.float64)
        self.ema = torch.zeros(num_problems, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    # ---- success tracking -------------------------------------------------------------
    def update(self, problem_ids: torch.Tensor, successes: torch.Tensor) -> None:
        """Record outcomes: [M] problem indices and [M] success values in [0, 1] (one per
        scored response; a problem may appear several times, e.g. its k group members)."""
        ids = problem_ids.reshape(-1).long()
        vals = successes.reshape(-1).double()
        if ids.shape != vals.shape:
            raise ValueError("problem_ids and successes must have the same number of elements")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_problems):
            raise ValueError(f"problem ids must lie in [0, {self.num_problems})")
        count = torch.zeros_like(self.attempts).index_add_(0, ids, torch.ones_like(vals))
        total = torch.zeros_like(self.successes).index_add_(0, ids, vals)
        touched = count > 0
        batch_mean = total / count.clamp(min=1.0)
        d = self.cfg.ema_decay
        blended = torch.where(self.attempts > 0, d * self.ema + (1 - d) * batch_mean, batch_mean)
        self.ema = torch.where(touched, blended, self.ema)
        self.attempts += count
        self.successes += total

    def success_rates(self) -> torch.Tensor:
        """[N] float64 s_i; ``unseen_success_rate`` for problems never attempted."""
        if self.cfg.success_tracking == "mean":
            tracked = self.successes / self.attempts.clamp(min=1.0)
        else:
            tracked = self.ema
        prior = torch.full_like(tracked, self.cfg.unseen_success_rate)
        return torch.where(self.attempts > 0, tracked, prior)

    # ---- drawing -------------------------------------------------------------------------
    def probabilities(self, iteration: int) -> torch.Tensor:
        """[N] float64 sampling probabilities at ``iteration`` (sum 1), degenerate rule applied."""
        rule = WEIGHT_RULES[self.cfg.strategy]
        weights = rule(self.success_rates(), self.difficulties, iteration, self.cfg)
        if weights.sum() <= 0:
            if self.cfg.strategy == "curriculum":
                raise ValueError("rl.sampling.curriculum_hard_threshold: no problem is hard "
                                 "enough, nothing left to sample after the switch")
            weights = torch.ones_like(weights)
        return weights / weights.sum()

    def sample(self, num_prompts: int, iteration: int) -> torch.Tensor:
        """Draw ``num_prompts`` problem indices ([num_prompts] int64) for ``iteration``."""
        probs = self.probabilities(iteration)
        if self.cfg.with_replacement:
            return torch.multinomial(probs, num_prompts, replacement=True,
                                     generator=self.generator)
        allowed = self._allowed(iteration)
        if num_prompts > int(allowed.sum()):
            raise ValueError(f"cannot draw {num_prompts} distinct prompts from "
                             f"{int(allowed.sum())} eligible problems; set "
                             "rl.sampling.with_replacement=true or lower the prompt count")
        positive = int((probs > 0).sum())
        if num_prompts <= positive:
            return torch.multinomial(probs, num_prompts, replacement=False,
                                     generator=self.generator)
        first = torch.multinomial(probs, positive, replacement=False, generator=self.generator)
        rest_w = (allowed & (probs == 0)).double()
        rest = torch.multinomial(rest_w, num_prompts - positive, replacement=False,
                                 generator=self.generator)
        return torch.cat([first, rest])

    def _allowed(self, iteration: int) -> torch.Tensor:
        """Problems the strategy may ever return at this iteration (curriculum filter)."""
        if self.cfg.strategy != "curriculum":
            return torch.ones(self.num_problems, dtype=torch.bool)
        return curriculum_weights(self.attempts, self.difficulties, iteration, self.cfg) > 0

    # ---- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors: the success statistics and the generator state."""
        return {
            "num_problems": self.num_problems,
            "attempts": self.attempts.clone(),
            "successes": self.successes.clone(),
            "ema": self.ema.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; the problem count must match."""
        if int(state["num_problems"]) != self.num_problems:
            raise ValueError(f"sampler checkpoint has {state['num_problems']} problems, "
                             f"the data set has {self.num_problems}")
        self.attempts = state["attempts"].clone().double()
        self.successes = state["successes"].clone().double()
        self.ema = state["ema"].clone().double()
        self.generator.set_state(state["generator"].clone())
