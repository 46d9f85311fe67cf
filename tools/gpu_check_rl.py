"""The in-process checks of tools/gpu_check.py: the reference log-prob recompute and the RL
policy update on a recorded rollout batch (one process each, one rank).

Usage: ``python tools/gpu_check_rl.py {ref_logprobs|policy_update} OUT_DIR``; prints
``RESULT <detail>`` and exits 0 when the check holds, raises otherwise. Always fp32, so the
recompute can be compared tightly with a float64 reference.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GROUP_SIZE = 4
NUM_PROMPTS = 2
LOGPROB_TOL = 2e-4
"""Largest |recompute - float64 reference| accepted (fp32 logits, nats)."""


def build(out: Path):
    """(trainer, cfg) of the tiny model with an RL section sized for the recorded batch."""
    from k15_megatron.config import load_config
    from k15_megatron.train.setup import build_trainer

    cfg = load_config(str(REPO / "examples" / "tiny.yaml"), [
        f"run_dir={out / 'rl'}", "precision.dtype=fp32", "seed=0", "logging.tensorboard=false",
        f"rl.group_size={GROUP_SIZE}", "rl.groups_per_micro_batch=1", "rl.updates_per_iteration=2",
        "rl.iterations=3", "rl.tau=0.01", f"rl.prompts_per_iteration={NUM_PROMPTS}", "optim.lr=1e-3",
        "optim.train_iters=6"])
    return build_trainer(cfg), cfg


def record_batch(tokenizer):
    """2 arithmetic prompts x 4 responses (correct, slip, correct, slip) as a RolloutBatch made by
    the replay buffer, rewarded by the task's own checker; behaviour log-probs still 0."""
    from k15_megatron.config.rl import ReplayConfig
    from k15_megatron.data.arithmetic import (ArithmeticTaskConfig, correct_response, generate_splits,
                                              parse_prompt, wrong_response)
    from k15_megatron.data.formatting import prompt_token_ids, response_token_ids
    from k15_megatron.rewards.arithmetic import check_answer
    from k15_megatron.rl.replay import SegmentReplayBuffer

    records = generate_splits(ArithmeticTaskConfig(seed=0, num_sft=0, num_train=NUM_PROMPTS, num_eval=0))["train"]
    buffer = SegmentReplayBuffer(ReplayConfig(), group_size=GROUP_SIZE)
    rng = random.Random(0)
    rewards = []
    for prompt_id, record in enumerate(records):
        problem = parse_prompt(record["prompt"])
        ids = buffer.add_group(prompt_id, torch.tensor(prompt_token_ids(tokenizer, record["prompt"])))
        for j, trajectory in enumerate(ids):
            text = correct_response(problem) if j % 2 == 0 else wrong_response(problem, rng)[0]
            tokens = torch.tensor(response_token_ids(tokenizer, text))
            buffer.add_segment(trajectory, tokens, torch.zeros(len(tokens)), iteration=0, policy_version=0,
                               finish_reason="stop")
            rewards.append(check_answer(text, record["answer"]))
    batch = buffer.pop_batch(iteration=0, pad_token_id=tokenizer.pad_token_id or 0)
    batch.rewards = torch.tensor(rewards, dtype=torch.float32)
    if batch.rewards.view(NUM_PROMPTS, GROUP_SIZE).std(dim=1).min() == 0:
        raise AssertionError(f"every group needs rewarded and unrewarded responses, got {rewards}")
    return batch


def recorded_batch(trainer, out: Path):
    """The recorded batch (``out/rollout_batch.pt``; made on first use): behaviour log-probs are
    the model's own (a rollout engine with synced weights gives these)."""
    from k15_megatron.train.logprobs import sequence_token_logprobs

    path = out / "rollout_batch.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    batch = record_batch(trainer.tokenizer)
    recomputed = sequence_token_logprobs(trainer.chunks, batch.input_ids, vocab_size=trainer.arch.vocab_size,
                                         micro_batch_size=GROUP_SIZE).cpu()
    batch.behaviour_logprobs[:, 1:] = torch.where(batch.response_mask[:, 1:], recomputed, 0.0)
    torch.save(batch, path)
    return batch


def float64_reference(trainer, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] log-softmax of the model's own logits (forward_logits), in float64, over the
    unpadded vocabulary."""
    from k15_megatron.parallel.device import compute_device
    from k15_megatron.train.schedule import forward_logits

    ids = input_ids.to(compute_device())
    logits = forward_logits(trainer.chunks, ids)[..., : trainer.arch.vocab_size].double()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    return logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()


def check_ref_logprobs(out: Path) -> str:
    from k15_megatron.train.logprobs import sequence_token_logprobs

    trainer, _ = build(out)
    batch = recorded_batch(trainer, out)
    vocab = trainer.arch.vocab_size
    whole = sequence_token_logprobs(trainer.chunks, batch.input_ids, vocab_size=vocab).cpu().double()
    micro = sequence_token_logprobs(trainer.chunks, batch.input_ids, vocab_size=vocab, micro_batch_size=2,
                                    chunk_size=16).cpu().double()
    reference = float64_reference(trainer, batch.input_ids)
    mask = batch.attention_mask[:, 1:]
    err = (whole - reference).abs()[mask].max().item()
    err_micro = (micro - whole).abs()[mask].max().item()
    if not (err < LOGPROB_TOL and err_micro < LOGPROB_TOL):
        raise AssertionError(f"max |recompute - float64| = {err:.2e}, |micro-batched - whole| = {err_micro:.2e} "
                             f"(tolerance {LOGPROB_TOL})")
    return (f"{int(mask.sum())} tokens of {batch.num_samples} samples: max |recompute - float64| {err:.1e}, "
            f"micro-batches of 2 and 16-token chunks vs whole {err_micro:.1e}")


def _reward_gap(trainer, batch) -> float:
    """mean sequence log-prob of rewarded minus unrewarded responses (loss-masked sums)."""
    from k15_megatron.train.logprobs import sequence_token_logprobs

    lp = sequence_token_logprobs(trainer.chunks, batch.input_ids, vocab_size=trainer.arch.vocab_size).cpu()
    seq = (lp * batch.loss_mask[:, 1:]).sum(dim=1)
    good = batch.rewards > 0.5
    return float(seq[good].mean() - seq[~good].mean())


def check_policy_update(out: Path) -> str:
    import math

    from k15_megatron.train.policy_update import update_policy

    trainer, cfg = build(out)
    batch = recorded_batch(trainer, out)
    gap_before = _reward_gap(trainer, batch)
    metrics = [update_policy(trainer, batch, cfg.rl) for _ in range(3)]
    gap_after = _reward_gap(trainer, batch)
    bad = {k: v for m in metrics for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)
           and not k.startswith("logprob/kl")}
    if bad:
        raise AssertionError(f"non-finite metrics: {bad}")
    drift = metrics[0].get("logprob/max_abs_diff", float("nan"))
    if not drift < 1e-4:
        raise AssertionError(f"behaviour vs recomputed log-probs differ by {drift} before any update")
    if not gap_after > gap_before:
        raise AssertionError(f"rewarded-minus-unrewarded log-prob gap did not rise: {gap_before:.3f} -> {gap_after:.3f}")
    losses = ", ".join(f"{m['train/loss']:.4f}" for m in metrics)
    return (f"3 updates x {cfg.rl.updates_per_iteration} steps, loss {losses}; rewarded-minus-unrewarded "
            f"sequence log-prob {gap_before:.3f} -> {gap_after:.3f}; first-call drift {drift:.1e}")


def main(argv) -> int:
    from k15_megatron.parallel.initialize import shutdown

    name, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    checks = {"ref_logprobs": check_ref_logprobs, "policy_update": check_policy_update}
    try:
        print("RESULT " + checks[name](out), flush=True)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
