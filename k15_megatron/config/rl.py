"""The `rl:` section of the configuration: policy optimisation, shaping, sampling, replay.

Plain dataclasses (OmegaConf-structured compatible). Defaults live here and only here; YAML
recipes override them. Choices that the Kimi k1.5 report leaves open (PAPER.md "Open:") are
marked "not in the report" in the field docs together with the default we picked. Cross-field checks live in
`RLConfig.validate()`, which returns error messages naming dotted keys (``rl.tau``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOG_Z_MODES = ("mean", "exact")
NORMALIZE_MODES = ("none", "length", "constant")
SAMPLING_STRATEGIES = ("uniform", "prioritized", "curriculum")
SUCCESS_TRACKING = ("mean", "ema")
SEGMENT_LOSS_POLICIES = ("all", "latest", "recent")
TIS_LEVELS = ("token", "sequence")


@dataclass
class LengthPenaltyConfig:
    """Length reward of PAPER.md section 2 and its schedule."""

    enabled: bool = True
    """Add the length reward to the task reward at all (after the warm-up)."""
    weight: float = 1.0
    """Multiplier of len_reward in [-0.5, 0.5] before it is added (not in the report; 1.0 = as written)."""
    warmup_iterations: int = 10
    """Iterations 0 .. warmup_iterations-1 get no length penalty (not in the report; report: 'a warm-up')."""


@dataclass
class SamplingConfig:
    """How prompts are drawn each iteration (PAPER.md section 3)."""

    strategy: str = "prioritized"
    """One of uniform | prioritized (prob ~ 1 - s_i) | curriculum (uniform, then hard only)."""
    with_replacement: bool = False
    """Draw the prompts of one iteration with replacement (False: distinct prompts per batch)."""
    success_tracking: str = "mean"
    """How s_i is tracked: mean (running mean over all attempts) | ema (exponential average)."""
    ema_decay: float = 0.9
    """EMA: s <- decay * s + (1 - decay) * batch_success (only with success_tracking=ema)."""
    unseen_success_rate: float = 0.0
    """s_i assumed for a problem never attempted; 0.0 = optimistic, maximal priority (not in the report)."""
    priority_floor: float = 0.0
    """Added to every 1 - s_i so solved problems keep a small chance (0.0 = exactly the report)."""
    curriculum_switch_iteration: int = 0
    """Curriculum: iterations before this sample uniformly, from it on only hard problems."""
    curriculum_hard_threshold: float = 0.5
    """Curriculum: a problem is hard when its difficulty, min-max normalised over the prompt
    set to [0, 1], is >= this value (0.5 with labels 1..5: labels 3, 4, 5 are hard)."""


@dataclass
class ReplayConfig:
    """Partial rollouts: the segment replay buffer (PAPER.md section 4)."""

    segment_token_budget: int = 8192
    """Output tokens one trajectory may generate per iteration before it is parked (not in the report)."""
    max_segments: int = 16
    """A trajectory still unfinished after this many segments is closed as 'max_segments'."""
    segment_loss_policy: str = "all"
    """Which segments enter the loss: all | latest (the last segment) | recent (age <= max_age)."""
    max_segment_age: int = 1
    """recent: keep segments produced at most this many iterations before the current one."""


@dataclass
class RepeatConfig:
    """Repeat detection during generation (PAPER.md section 4)."""

    enabled: bool = True
    """Stop a response whose tail repeats a block (checked incrementally while generating)."""
    max_period: int = 256
    """Longest repeated block (in tokens) searched for at the tail."""
    min_repeats: int = 8
    """A block must occur this many times in a row at the tail."""
    min_span_tokens: int = 64
    """...and the repeated tail must cover at least this many tokens (guards short periods)."""
    penalty: float = 0.0
    """Subtracted from the reward of a response stopped for repetition (not in the report; 0 = none)."""


@dataclass
class LogprobCheckConfig:
    """Behaviour (rollout engine) vs trainer log-prob drift: monitor and optional correction."""

    tis_enabled: bool = False
    """Weight the loss by truncated importance ratios pi_trainer / pi_behaviour. Needs
    ``rl.reference=recompute`` (with ``behaviour`` the ratio is a no-op and is refused)."""
    tis_level: str = "token"
    """token (per-token ratios) | sequence (product over the response)."""
    tis_clip: float = 2.0
    """Truncation C: weights are min(ratio, C)."""


@dataclass
class RLConfig:
    """Online policy mirror descent (PAPER.md section 1) and everything around it."""

    tau: float = 0.01
    """KL weight tau of the mirror-descent objective (not in the report; a public re-implementation: 0.01)."""
    group_size: int = 8
    """k: responses sampled per prompt; the tau*log Z baseline is estimated from them (not in the report).
    At least 2: with k=1 the baseline equals the reward and every advantage is 0."""
    log_z: str = "mean"
    """Baseline: mean (report's practical r_bar) | exact (tau * log mean exp(r / tau))."""
    normalize: str = "none"
    """Sequence log-prob: none (sum, report) | length (mean per token) | constant (sum / C)."""
    normalize_constant: float = 1.0
    """C for normalize=constant (e.g. the maximum response length)."""
    reset_optimizer: bool = True
    """Clear the optimizer state at the start of every iteration (report)."""
    logprob_chunk_tokens: int = 2048
    """Tokens per chunk of float32 logits in the RL loss and the recompute: the loss holds at most
    one [chunk, vocab/TP] block (and its gradient), never a micro-batch's full logits."""
    length_penalty: LengthPenaltyConfig = field(default_factory=LengthPenaltyConfig)
    """Length reward and its warm-up schedule."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Prompt sampling."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Segment replay buffer for partial rollouts."""
    repeat: RepeatConfig = field(default_factory=RepeatConfig)
    """Repeat detection."""
    logprob_check: LogprobCheckConfig = field(default_factory=LogprobCheckConfig)
    """Logprob mismatch monitor and truncated importance sampling."""
    iterations: int = 100
    """RL iterations (rollout -> rewards -> train -> sync) of ``k15 rl``."""
    overlap_rewards: bool = True
    """Score finished responses on a background thread, group_size at a time as they finish,
    while generation continues (:mod:`k15_megatron.jobs.reward_overlap`); the reward phase then
    scores only the rest (and, with several rollout replicas, the other replicas' responses).
    The rewards are the same either way."""
    prompts_per_iteration: int = 64
    """New prompts sampled per iteration (each opens a group of group_size trajectories). Must
    be a multiple of data-parallel size x updates_per_iteration (checked before start-up): an
    iteration trains on the largest such multiple of its finished groups, so that every rank
    and every optimizer step gets the same number of groups."""
    updates_per_iteration: int = 1
    """Optimizer steps per iteration; the groups an iteration trains on are split into this many
    equal mini-batches (and each over the data-parallel ranks). An iteration whose finished
    groups are fewer than data-parallel size x updates_per_iteration (possible only with partial
    rollouts) trains nothing and says so in one line; ``train/groups`` and
    ``rollout/groups_ready`` are logged every iteration."""
    groups_per_micro_batch: int = 1
    """The most whole groups one Megatron micro-batch holds (a memory bound; a group is never
    split: its baseline needs all k), in the training steps and in the reference log-prob
    recompute alike: one forward holds at most groups_per_micro_batch * group_size responses,
    whatever the batch size. Micro-batches are packed (each response's real tokens only) and
    also close at data.micro_batch_tokens tokens; the loss is normalised over the step's
    samples, so the update does not depend on the split."""
    reference: str = "recompute"
    """log pi_i of the loss: recompute (the trainer's log-probs at the start of the iteration,
    exact) | behaviour (the rollout engine's; includes older policies' segments). The trainer's
    forward over the batch runs either way: it gives the behaviour-vs-trainer drift metrics
    (``logprob/*``)."""
    eval_interval: int = 0
    """Evaluate on data.eval_path every this many iterations (0 = only before and after)."""
    eval_max_prompts: int = 0
    """Held-out prompts per periodic evaluation (0 = all)."""

    def validate(self) -> list[str]:
        """Return one message per invalid field, each naming its dotted key (empty if valid)."""
        return self.config_errors("rl")

    def config_errors(self, prefix: str = "rl") -> list[str]:
        """``validate()`` with the section's dotted key given (the schema validator's hook)."""
        errors: list[str] = []

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                errors.append(f"{prefix}.{key}: {msg}")

        def choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
            need(value in allowed, key, f"must be one of {list(allowed)}, got {value!r}")

        need(self.tau > 0, "tau", f"must be > 0, got {self.tau}")
        need(self.group_size >= 2, "group_size",
             f"must be >= 2, got {self.group_size}: the baseline is the mean reward of the k "
             "responses of a prompt, so with k=1 every advantage is 0 and nothing is learned")
        choice(self.log_z, "log_z", LOG_Z_MODES)
        choice(self.normalize, "normalize", NORMALIZE_MODES)
        need(self.normalize_constant > 0, "normalize_constant", "must be > 0")
        need(self.logprob_chunk_tokens >= 1, "logprob_chunk_tokens", "must be >= 1")

        lp = self.length_penalty
        need(lp.weight >= 0, "length_penalty.weight", f"must be >= 0, got {lp.weight}")
        need(lp.warmup_iterations >= 0, "length_penalty.warmup_iterations", "must be >= 0")

        s = self.sampling
        choice(s.strategy, "sampling.strategy", SAMPLING_STRATEGIES)
        choice(s.success_tracking, "sampling.success_tracking", SUCCESS_TRACKING)
        need(0.0 <= s.ema_decay < 1.0, "sampling.ema_decay",
             f"must be in [0, 1), got {s.ema_decay}")
        need(0.0 <= s.unseen_success_rate <= 1.0, "sampling.unseen_success_rate",
             "must be in [0, 1]")
        need(s.priority_floor >= 0, "sampling.priority_floor", "must be >= 0")
        need(s.curriculum_switch_iteration >= 0, "sampling.curriculum_switch_iteration",
             "must be >= 0")
        need(0.0 <= s.curriculum_hard_threshold <= 1.0, "sampling.curriculum_hard_threshold",
             f"must be in [0, 1] (difficulties are normalised to [0, 1]), got "
             f"{s.curriculum_hard_threshold}")

        r = self.replay
        need(r.segment_token_budget >= 1, "replay.segment_token_budget", "must be >= 1")
        need(r.max_segments >= 1, "replay.max_segments", "must be >= 1")
        choice(r.segment_loss_policy, "replay.segment_loss_policy", SEGMENT_LOSS_POLICIES)
        need(r.max_segment_age >= 0, "replay.max_segment_age", "must be >= 0")

        rp = self.repeat
        need(rp.max_period >= 1, "repeat.max_period", "must be >= 1")
        need(rp.min_repeats >= 2, "repeat.min_repeats", f"must be >= 2, got {rp.min_repeats}")
        need(rp.min_span_tokens >= 0, "repeat.min_span_tokens", "must be >= 0")
        need(rp.penalty >= 0, "repeat.penalty", "must be >= 0 (it is subtracted)")

        need(self.iterations >= 0, "iterations", "must be >= 0")
        need(self.prompts_per_iteration >= 1, "prompts_per_iteration", "must be >= 1")
        need(self.updates_per_iteration >= 1, "updates_per_iteration", "must be >= 1")
        need(self.groups_per_micro_batch >= 1, "groups_per_micro_batch", "must be >= 1")
        choice(self.reference, "reference", ("recompute", "behaviour"))
        need(self.eval_interval >= 0, "eval_interval", "must be >= 0")
        need(self.eval_max_prompts >= 0, "eval_max_prompts", "must be >= 0")

        c = self.logprob_check
        choice(c.tis_level, "logprob_check.tis_level", TIS_LEVELS)
        need(c.tis_clip > 0, "logprob_check.tis_clip", f"must be > 0, got {c.tis_clip}")
        need(not (c.tis_enabled and self.reference == "behaviour"), "logprob_check.tis_enabled",
             f"true with {prefix}.reference=behaviour does nothing: the importance ratio "
             "pi_trainer / pi_behaviour is computed against the behaviour log-probs, which are "
             f"then the reference too; set {prefix}.reference=recompute or "
             f"{prefix}.logprob_check.tis_enabled=false")
        return errors
