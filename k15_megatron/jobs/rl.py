"""``k15 rl CONFIG [overrides]``: the Kimi k1.5 RL loop on the colocated hybrid engine.

Each iteration, on every rank (SPMD): sample prompts -> generate one segment for every open
trajectory (partial rollouts) -> score the groups that finished -> train on them with the
mirror-descent loss -> sync the new weights into vLLM -> evaluate / checkpoint. The algorithm
lives in ``k15_megatron.rl`` and the system in ``k15_megatron.engine``; this module only calls
them in order. ``run_state`` holds everything a resumed run needs besides the model, optimizer
and RNGs (iteration, sampler with success rates, replay buffer with unfinished segments, LR
schedule, policy version); each rank's state adds the random stream of vLLM's sampler, so a
resumed run draws the same samples as an uninterrupted one in either sampling mode (see
``start``).

A vision-language model (Qwen2-VL, Qwen2.5-VL) trains on image prompts and text prompts mixed
(:mod:`k15_megatron.data.prompt_set`): the engine generates each segment with its prompt's
images, looked up by prompt id (``images_of``; so a trajectory continued in a later iteration,
also after a resume, keeps its images), and the recompute and the update run every row with
its prompt's image inputs (``pixels_of``; :func:`k15_megatron.train.policy_update.update_policy`).
"""

from __future__ import annotations

import functools
import os
import time

import torch

from k15_megatron.checkpoint import run_ckpt, run_dir
from k15_megatron.config.validate import rl_optimizer_steps
from k15_megatron.data.prompt_set import PromptSet, prompt_token_limit
from k15_megatron.engine.hybrid import HybridEngine
from k15_megatron.engine.weight_sync import ColocatedWeightSync
from k15_megatron.jobs.evaluate import evaluate
from k15_megatron.jobs.metrics_log import MetricsLogger
from k15_megatron.jobs.preflight import data_processor
from k15_megatron.jobs.preemption import PreemptionFlag
from k15_megatron.jobs.progress import PhaseProgress
from k15_megatron.jobs.reward_overlap import OverlappedRewards
from k15_megatron.jobs.rl_rewards import score_rollouts
from k15_megatron.models.gpt import torch_dtype
from k15_megatron.parallel.device import collective_device, device_memory_stats
from k15_megatron.rewards.registry import RewardManager
from k15_megatron.rl.replay import SegmentReplayBuffer
from k15_megatron.rl.sampling import PromptSampler
from k15_megatron.rollout.engine import RolloutEngine, Sampling
from k15_megatron.rollout.partial import rollout_iteration
from k15_megatron.train.logprobs import sequence_token_logprobs
from k15_megatron.train.policy_update import update_policy
from k15_megatron.train.setup import build_trainer, engine_model_folder, write_run_assets


def memory_metrics() -> dict:
    """``memory/*``: :func:`device_memory_stats` of every rank, the largest over ranks (GiB).
    Collective."""
    stats = device_memory_stats()
    names = sorted(stats)
    values = torch.tensor([stats[n] for n in names], dtype=torch.float64, device=collective_device())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return {f"memory/{n}": float(v) for n, v in zip(names, values.tolist())}


class RLJob:
    """The state of one RL run on this rank; ``run()`` is the loop."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.trainer = build_trainer(cfg, num_optimizer_steps=rl_optimizer_steps(cfg.rl))
        self.assets = write_run_assets(self.trainer)
        tok = self.trainer.tokenizer
        if not cfg.data.train_path:
            raise ValueError("k15 rl needs data.train_path (a JSONL of {prompt, answer} records)")
        read = functools.partial(PromptSet.from_jsonl, tokenizer=tok, max_prompt_tokens=prompt_token_limit(cfg.rollout),
                                 too_long=cfg.data.too_long, processor=data_processor(cfg), fields=cfg.data.fields)
        self.prompts = read(cfg.data.train_path)
        self.eval_prompts = read(cfg.data.eval_path) if cfg.data.eval_path else None
        self.data_metrics = self.report_filtered_prompts()  # logged with the first iteration
        self.sampler = PromptSampler(len(self.prompts), cfg.rl.sampling, difficulties=self.prompts.difficulties,
                                     seed=cfg.seed)
        self.buffer = SegmentReplayBuffer(cfg.rl.replay, group_size=cfg.rl.group_size)
        self.rewards = RewardManager(cfg.rewards)
        scores_here = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0  # rl_rewards
        self.overlap = (OverlappedRewards(self.rewards, self.prompts.records, tok, chunk=cfg.rl.group_size)
                        if cfg.rl.overlap_rewards and scores_here else None)
        self.rollout = RolloutEngine.create(cfg.rollout, model_path=engine_model_folder(self.trainer, self.assets),
                                            repeat=cfg.rl.repeat, seed=cfg.seed)
        dtype = torch_dtype(cfg.precision.dtype)
        self.hybrid = HybridEngine(model_chunks=self.trainer.chunks, optimizer=self.trainer.optimizer,
                                   arch=self.trainer.arch, rollout=self.rollout,
                                   weight_sync=ColocatedWeightSync(self.rollout.llm, dtype=dtype,
                                                                   bucket_bytes=cfg.engine.sync_bucket_mb << 20),
                                   cfg=cfg.engine, reset_optimizer=cfg.rl.reset_optimizer,
                                   recompute_logprobs=functools.partial(sequence_token_logprobs,
                                                                        vocab_size=self.trainer.arch.vocab_size))
        self.iteration = 0
        self.logger = None

    def report_filtered_prompts(self) -> dict:
        """The counts of prompts dropped at load as too long, as metrics (the pre-start check,
        :mod:`k15_megatron.jobs.preflight`, already printed which lines)."""
        metrics = {}
        for key, prompts in (("data/prompts_filtered_too_long", self.prompts),
                             ("data/eval_prompts_filtered_too_long", self.eval_prompts)):
            if prompts is not None:
                metrics[key] = float(len(prompts.filtered_lines))
        return metrics

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        self.start()
        if self.iteration:
            self.data_metrics = {}  # a resumed run logged them at its first iteration
        self.logger = MetricsLogger(cfg.logging, enabled=self.trainer.is_logging_rank,
                                    resume_from_iteration=self.iteration)
        preemption = PreemptionFlag()
        if self.iteration == 0:
            self.log_eval("before")
        progress = PhaseProgress("rl", cfg.rl.iterations, enabled=self.trainer.is_logging_rank)
        while self.iteration < cfg.rl.iterations:
            begin = time.perf_counter()
            progress.start_iteration(self.iteration + 1)
            with progress.phase("rollout") as phase:
                metrics = self.rollout_step()
                phase["tokens"] = metrics["rollout/generated_tokens"]
            batch, groups = self.pop_ready_groups()
            metrics.update(groups)
            if batch is not None:
                with progress.phase("reward") as phase:
                    metrics.update(self.reward_step(batch))
                    if metrics.get("time/reward_overlapped_s"):
                        phase["note"] = f"+{metrics['time/reward_overlapped_s']:.2f} s during rollout"
                with progress.phase("train") as phase:
                    metrics.update(self.train_step(batch))
                    phase["tokens"] = metrics["train/tokens"]
            self.iteration += 1
            if batch is not None:
                with progress.phase("sync"):
                    metrics.update(self.hybrid.to_rollout(policy_version=self.iteration))
            metrics["time/iteration_s"] = time.perf_counter() - begin
            metrics.update(self.data_metrics)
            self.data_metrics = {}
            metrics.update(memory_metrics())
            progress.end_iteration()
            self.logger.log(self.iteration, metrics, prefix="rl ")
            last = self.iteration == cfg.rl.iterations
            if cfg.rl.eval_interval and self.iteration % cfg.rl.eval_interval == 0 and not last:
                self.log_eval("periodic")
            stop = preemption.requested()  # collective: every rank asks every iteration
            if stop or (self.should_save() and not last):
                self.save()
            if stop:
                self.trainer.log(f"rl: signal received, saved iteration {self.iteration}, exiting")
                self.close()
                return
        self.save()
        self.log_eval("after")
        self.close()
        self.trainer.log(f"rl: done; wrote checkpoint {run_ckpt.iteration_dir_name(self.iteration)} in "
                         f"{os.path.abspath(cfg.checkpoint.save_dir)}, metrics in {os.path.abspath(cfg.logging.dir)}")

    def close(self) -> None:
        """Flush logs, then release vLLM. Its teardown destroys the process-wide torch.distributed
        groups, so it must come after the last collective of the run."""
        self.logger.close()
        if self.overlap is not None:
            self.overlap.close()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        self.rollout.shutdown()

    # -- the steps -----------------------------------------------------------------------------
    def rollout_step(self) -> dict:
        cfg = self.cfg
        ids = self.sampler.sample(cfg.rl.prompts_per_iteration, self.iteration)
        prompts = [(int(i), self.prompts.token_ids[int(i)]) for i in ids]
        sampling = Sampling.from_config(cfg.rollout, seed=cfg.seed if cfg.deterministic else None)
        return rollout_iteration(self.rollout, self.buffer, prompts, iteration=self.iteration, sampling=sampling,
                                 images_of=self.prompts.images_of,
                                 on_finished=self.overlap.watch(self.buffer) if self.overlap else None).metrics()

    def reward_step(self, batch) -> dict:
        """Rewards of ``batch`` (those scored during generation are taken, the rest scored now);
        metrics include ``time/reward_overlapped_s`` (scoring done during generation, off this
        phase's time) and ``reward/overlapped_share`` (the share of samples scored then)."""
        start = time.perf_counter()
        precomputed, overlapped_s = self.overlap.take(batch.trajectory_ids) if self.overlap else ({}, 0.0)
        correct, metrics = score_rollouts(batch, self.prompts.records, self.rewards, self.trainer.tokenizer,
                                          self.cfg.rl, self.iteration, precomputed=precomputed)
        self.sampler.update(batch.prompt_ids, correct.float())
        metrics["time/reward_s"] = time.perf_counter() - start
        if self.overlap is not None:
            metrics["time/reward_overlapped_s"] = overlapped_s
            metrics["reward/overlapped_share"] = len(precomputed) / batch.num_samples
        return metrics

    def train_step(self, batch) -> dict:
        start = time.perf_counter()
        metrics = self.hybrid.to_train()
        metrics.update(update_policy(self.trainer, batch, self.cfg.rl, images=self.prompts.pixels_of,
                                     micro_batch_tokens=self.cfg.data.micro_batch_tokens))
        elapsed = time.perf_counter() - start
        tokens = float(batch.attention_mask.sum())
        metrics.update({"time/train_s": elapsed, "train/tokens": tokens,
                        "throughput/train_tokens_per_s": tokens / max(elapsed, 1e-9)})
        return metrics

    def log_eval(self, tag: str) -> dict:
        if self.eval_prompts is None:
            return {}
        cfg = self.cfg
        prompts = self.eval_prompts.head(cfg.eval.max_prompts)
        if tag == "periodic":
            prompts = prompts.head(cfg.rl.eval_max_prompts)
        metrics = evaluate(self.rollout, prompts, self.rewards, self.trainer.tokenizer,
                           num_samples=cfg.eval.num_samples, temperature=cfg.eval.temperature,
                           max_response_tokens=cfg.rollout.max_response_tokens, seed=cfg.seed, ks=cfg.eval.ks)
        per_prompt = metrics.pop("per_prompt")
        if self.trainer.is_logging_rank and tag in ("before", "after"):
            torch.save(per_prompt, os.path.join(cfg.run_dir, f"eval_{tag}.pt"))
        self.logger.log(self.iteration, metrics, prefix=f"eval[{tag}] ", always_print=True)
        return metrics

    # -- sizes and checkpoints -----------------------------------------------------------------
    def pop_ready_groups(self):
        """This iteration's training batch (:func:`take_ready_groups`), or None; metrics
        ``rollout/groups_ready``, ``rollout/groups_open`` and ``train/groups`` every iteration,
        and one line on the logging rank when nothing trains."""
        batch, metrics, reason = take_ready_groups(self.buffer, dp_size=self.trainer.layout.dp_size,
                                                   updates_per_iteration=self.cfg.rl.updates_per_iteration,
                                                   iteration=self.iteration,
                                                   pad_token_id=self.trainer.tokenizer.pad_token_id or 0)
        if reason:
            self.trainer.log(f"rl: iteration {self.iteration + 1} trains nothing: {reason}")
        return batch, metrics

    def should_save(self) -> bool:
        interval = self.cfg.checkpoint.save_interval
        return bool(interval) and self.iteration % interval == 0

    def run_state(self) -> dict:
        return {"iteration": self.iteration, "sampler": self.sampler.state_dict(), "buffer": self.buffer.state_dict(),
                "scheduler": self.trainer.scheduler.state_dict(), "policy_version": self.rollout.policy_version}

    def save(self) -> None:
        with self.hybrid.trainer_state_resident():  # what to_rollout offloaded is read here
            run_dir.save_checkpoint(self.cfg, self.iteration, is_logging_rank=self.trainer.is_logging_rank,
                                    model_chunks=self.trainer.chunks, optimizer=self.trainer.optimizer,
                                    run_state=self.run_state(),
                                    rank_state={"rollout_sampler_rng": self.rollout.sampler_rng_state()},
                                    hf_assets_dir=self.assets)

    def start(self) -> None:
        """Resume from the newest checkpoint if there is one, then push the weights into vLLM
        under the policy version they had. The sampler's random stream is put back after that
        sync: its log-prob check draws from the same stream, which an uninterrupted run had done
        before it saved."""
        state, rank_state = self.resume()
        if not state:
            self.trainer.log(f"rl: weights: {self.trainer.init_source}; layout {self.trainer.layout.describe()}")
        self.hybrid.to_rollout(policy_version=state.get("policy_version", 0))
        if "rollout_sampler_rng" in rank_state:
            self.rollout.set_sampler_rng_state(rank_state["rollout_sampler_rng"])

    def resume(self) -> tuple[dict, dict]:
        """Load the newest checkpoint (with checkpoint.resume=auto); its (run_state, rank_state),
        or two empty dicts for a fresh run."""
        if self.cfg.checkpoint.resume != "auto":
            return {}, {}
        path = run_ckpt.find_resume_checkpoint(self.cfg.checkpoint.save_dir)
        if path is None:
            return {}, {}
        state, rank_state = run_ckpt.load_run_checkpoint(path, model_chunks=self.trainer.chunks,
                                                         optimizer=self.trainer.optimizer)
        self.iteration = state["iteration"]
        self.sampler.load_state_dict(state["sampler"])
        self.buffer.load_state_dict(state["buffer"])
        self.trainer.scheduler.load_state_dict(state["scheduler"])
        self.trainer.log(f"rl: resumed from {path} at iteration {self.iteration}")
        return state, rank_state


def take_ready_groups(buffer: SegmentReplayBuffer, *, dp_size: int, updates_per_iteration: int, iteration: int,
                      pad_token_id: int):
    """Pop the groups one iteration trains on: the largest multiple of ``dp_size x
    updates_per_iteration`` of the finished groups, oldest first, so that every data-parallel
    rank and every optimizer step gets the same number of groups (each rank then runs the same
    number of micro-batches, as the pipeline schedule and the gradient all-reduce need); the
    rest wait for the next iteration. With ``rl.prompts_per_iteration`` a multiple of that unit
    (checked before start-up) and no partial rollouts, every finished group is taken.

    Returns ``(batch or None, metrics, reason)``: metrics ``rollout/groups_ready`` (finished),
    ``rollout/groups_open`` (with a trajectory still to continue) and ``train/groups`` (taken);
    ``reason`` is a one-line explanation when nothing is taken, else None."""
    ready = len(buffer.ready_groups())
    still_open = len({t.group_id for t in buffer.unfinished()})
    unit = dp_size * updates_per_iteration
    usable = (ready // unit) * unit
    metrics = {"rollout/groups_ready": float(ready), "rollout/groups_open": float(still_open),
               "train/groups": float(usable)}
    if usable == 0:
        reason = (f"{ready} group(s) finished, {still_open} still open (partial rollouts continue them next "
                  f"iteration); a step needs a multiple of {unit} finished groups (rl.updates_per_iteration="
                  f"{updates_per_iteration} x data-parallel size {dp_size})")
        return None, metrics, reason
    return buffer.pop_batch(iteration=iteration, max_groups=usable, pad_token_id=pad_token_id), metrics, None


def run(cfg) -> None:
    RLJob(cfg).run()


HELP_KEYS = ("data.train_path", "data.eval_path", "rl.iterations", "rl.prompts_per_iteration", "rl.group_size",
             "rl.updates_per_iteration", "rl.groups_per_micro_batch", "rl.tau", "rl.eval_interval", "rewards.default",
             "rollout.max_response_tokens", "rollout.max_model_len", "rollout.temperature",
             "rollout.tensor_parallel_size", "optim.lr", "checkpoint.save_dir", "checkpoint.save_interval",
             "checkpoint.resume")
"""The config keys ``k15 rl --help`` lists (besides those of every job)."""


def main(argv=None) -> int:
    from k15_megatron.jobs.launch import job_main
    from k15_megatron.jobs.preflight import job_checks

    # job_checks("rl") runs the RL config rules (rl_job_errors) with the data and tokenizer checks.
    return job_main("k15 rl", __doc__, run, argv, job_errors=job_checks("rl"), help_keys=HELP_KEYS,
                    run_record="rl")
