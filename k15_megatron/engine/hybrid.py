"""The colocated hybrid engine: the same processes switch between Megatron training and vLLM rollout.

``to_rollout(policy_version)``: free the trainer's memory it does not need during rollouts
(engine/memory.py: gradient buffers, optimizer state - dropped when ``rl.reset_optimizer``
discards it anyway -, optionally the parameters after the sync), wake vLLM, push the trainer's
weights into vLLM in place (no disk, no restart), tag new segments with ``policy_version``, and
check that vLLM's log-probs equal the trainer's on a few sampled sequences. ``to_train()``: put
vLLM to sleep and restore what ``to_rollout`` freed, bit for bit (gradient buffers come back
zeroed). Each step is timed and reports this rank's bytes (``offload/*_bytes``, ``onload/*_bytes``);
both return a metrics dict. The memory steps run on CPU too (only pinning and CUDA
synchronisation are GPU-only); vLLM's sleep/wake are no-ops on CPU.
"""

from __future__ import annotations

import contextlib
import time

import torch

from k15_megatron.engine import memory
from k15_megatron.rl.mismatch import logprob_mismatch_metrics


class LogprobDriftError(RuntimeError):
    """vLLM's log-probs after a weight sync disagree with the trainer's beyond the tolerance."""


class _Timer:
    def __init__(self, metrics: dict, name: str):
        self.metrics, self.name = metrics, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.metrics[f"time/{self.name}_s"] = time.perf_counter() - self.start


class HybridEngine:
    """Owns the switch between the trainer (Megatron) and the rollout engine (vLLM)."""

    def __init__(self, *, model_chunks, optimizer, arch, rollout, weight_sync, cfg,
                 reset_optimizer: bool, recompute_logprobs):
        """
        Args:
            model_chunks: the DDP-wrapped Megatron model chunks of this rank.
            optimizer: their MegatronOptimizer.
            arch: the resolved ModelArch (names/layouts for the sync).
            rollout: a :class:`k15_megatron.rollout.engine.RolloutEngine`.
            weight_sync: a transport with ``sync(model, arch)`` (engine/weight_sync.py).
            cfg: the ``engine`` config section.
            reset_optimizer: rl.reset_optimizer: the optimizer state is dropped at ``to_rollout``
                (the next update would discard it anyway), whatever ``cfg`` says about offloading.
            recompute_logprobs: ``f(model_chunks, input_ids [B, T]) -> [B, T-1]`` float32 token
                log-probs of the trainer (collective; the log-prob check after each sync). For a
                vision-language model it is called with ``images=`` a list of B dicts
                (``pixel_values``, ``image_grid_thw``; see
                :func:`k15_megatron.train.logprobs.sequence_token_logprobs`).
        """
        self.model_chunks, self.optimizer, self.arch = model_chunks, optimizer, arch
        self.rollout, self.weight_sync, self.cfg = rollout, weight_sync, cfg
        self.reset_optimizer = reset_optimizer
        self.recompute_logprobs = recompute_logprobs
        self.mode = "train"
        self._offloaded: dict = {}  # name -> memory.Offloaded, restored by to_train

    def to_rollout(self, policy_version: int) -> dict:
        """Switch to generation with the trainer's current weights (collective)."""
        if self.mode != "train":
            raise RuntimeError(f"to_rollout() called in mode {self.mode!r}")
        metrics: dict = {}
        with _Timer(metrics, "offload"):
            if self.cfg.offload_grad_buffers:
                self._offload("grad", memory.release_grad_buffers(self.model_chunks), metrics)
            if self.reset_optimizer:
                metrics["offload/optimizer_dropped_bytes"] = memory.drop_optimizer_states(self.optimizer)
            elif self.cfg.offload_optimizer_states:
                self._offload("optimizer", memory.offload_optimizer_states(self.optimizer), metrics)
        with _Timer(metrics, "wake"):
            self.rollout.wake_up()
        with _Timer(metrics, "sync"):
            sync = self.weight_sync.sync(self.model_chunks[0], self.arch)
            self.rollout.mark_weights_updated(policy_version)
        metrics.update({f"sync/{k}": v for k, v in sync.items()})
        if self.cfg.check_num_sequences > 0:
            with _Timer(metrics, "logprob_check"):
                metrics.update(self.check_logprobs())
        if self.cfg.offload_params:
            with _Timer(metrics, "offload_params"):
                self._offload("param", memory.offload_params(self.model_chunks), metrics)
        self.mode = "rollout"
        return metrics

    def to_train(self) -> dict:
        """Switch back to training (collective)."""
        if self.mode != "rollout":
            raise RuntimeError(f"to_train() called in mode {self.mode!r}")
        metrics: dict = {}
        with _Timer(metrics, "sleep"):
            self.rollout.sleep(level=self.cfg.vllm_sleep_level)
        with _Timer(metrics, "onload"):
            for name in ("param", "grad", "optimizer"):
                if name in self._offloaded:
                    metrics[f"onload/{name}_bytes"] = self._offloaded.pop(name).restore()
        self.mode = "train"
        return metrics

    def _offload(self, name: str, record: memory.Offloaded, metrics: dict) -> None:
        self._offloaded[name] = record
        metrics[f"offload/{name}_bytes"] = record.nbytes

    @contextlib.contextmanager
    def trainer_state_resident(self):
        """Within this context the parameters and optimizer state that ``to_rollout`` freed are
        back in place (a checkpoint save reads them); on exit they are freed again. The
        gradient buffers stay freed (no checkpoint holds them)."""
        back = [name for name in ("param", "optimizer") if name in self._offloaded]
        for name in back:
            self._offloaded.pop(name).restore()
        try:
            yield
        finally:
            if "param" in back:
                self._offloaded["param"] = memory.offload_params(self.model_chunks)
            if "optimizer" in back:
                self._offloaded["optimizer"] = memory.offload_optimizer_states(self.optimizer)

    def check_logprobs(self) -> dict:
        """Sample a few sequences, recompute their log-probs with the trainer, compare.

        Every rank samples the same prompts (fixed token ids from the tokenizer's range; for a
        vision-language model each prompt also holds one random image, see
        ``RolloutEngine.sample_for_check``) with a fixed seed; it runs before ``offload_params``
        frees the parameters the trainer's recomputation needs. Raises LogprobDriftError past
        the configured tolerance.
        """
        samples = self.rollout.sample_for_check(num_sequences=self.cfg.check_num_sequences,
                                                max_tokens=self.cfg.check_max_tokens,
                                                vocab_size=self.arch.vocab_size)
        longest = max(len(s.prompt) + len(s.result.tokens) for s in samples)
        ids = torch.zeros(len(samples), longest, dtype=torch.long)
        mask = torch.zeros(len(samples), longest - 1, dtype=torch.bool)
        behaviour = torch.zeros(len(samples), longest - 1)
        for i, sample in enumerate(samples):
            n_prompt, n_new = len(sample.prompt), len(sample.result.tokens)
            ids[i, :n_prompt] = torch.as_tensor(sample.prompt)
            ids[i, n_prompt:n_prompt + n_new] = sample.result.tokens
            mask[i, n_prompt - 1:n_prompt - 1 + n_new] = True
            behaviour[i, n_prompt - 1:n_prompt - 1 + n_new] = sample.result.logprobs
        images = [s.images for s in samples]
        extra = {"images": images} if any(im is not None for im in images) else {}
        trainer = self.recompute_logprobs(self.model_chunks, ids, **extra).cpu()  # compared on the host
        metrics = logprob_mismatch_metrics(behaviour, trainer, mask)
        metrics = {f"logprob_check/{k}": float(v) for k, v in metrics.items()}
        tolerance = self.cfg.check_max_abs_diff
        mean_diff = metrics.get("logprob_check/mean_abs_diff")
        if tolerance is not None and mean_diff is not None and mean_diff > tolerance:
            raise LogprobDriftError(
                f"after the weight sync vLLM's log-probs differ from the trainer's by "
                f"{mean_diff:.3g} on average (engine.check_max_abs_diff={tolerance}); "
                "the weight mapping or the engine's numerics are off")
        return metrics
