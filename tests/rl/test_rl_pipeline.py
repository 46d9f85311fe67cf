"""Contract test: the rl pieces composed as the trainer will use them, on a tiny real model.

replay buffer -> RolloutBatch -> shaped rewards -> token_logprobs (shifted labels) ->
sequence_logprobs over the loss mask -> mirror_descent_loss -> backward, compared with the same
objective written independently in float64 with a full log_softmax.
"""

from __future__ import annotations

import torch

from k15_megatron.config.rl import LengthPenaltyConfig, ReplayConfig
from k15_megatron.rl.logprobs import token_logprobs
from k15_megatron.rl.loss import mirror_descent_loss, sequence_logprobs
from k15_megatron.rl.mismatch import logprob_mismatch_metrics
from k15_megatron.rl.replay import SegmentReplayBuffer
from k15_megatron.rl.shaping import shaped_rewards

V, H, K, TAU = 32, 16, 2, 0.1


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, H)
        self.mix = torch.nn.Linear(H, H)
        self.out = torch.nn.Parameter(torch.randn(V, H) * 0.5)

    def hidden(self, ids):
        return torch.tanh(self.mix(self.embed(ids)))


def _fill_buffer(model):
    buf = SegmentReplayBuffer(ReplayConfig(segment_token_budget=3, segment_loss_policy="latest"),
                              group_size=K)
    g = torch.Generator().manual_seed(1)
    for prompt_id in (4, 5):
        for tid in buf.add_group(prompt_id, torch.randint(0, V, (3,), generator=g)):
            for it in range(1 + tid % 2):  # odd trajectories take two segments
                traj = next(t for t in buf.unfinished() if t.trajectory_id == tid)
                n = 3 if it == 0 and tid % 2 else 1 + tid % 3
                toks = torch.randint(0, V, (n,), generator=g)
                ctx = torch.cat([traj.prompt_tokens, traj.response_tokens(), toks])
                with torch.no_grad():  # behaviour log-probs: the model's own, as vLLM would give
                    lp_all = torch.log_softmax(model.hidden(ctx[:-1]) @ model.out.t(), -1)
                    lp = lp_all.gather(-1, ctx[1:, None])[-n:, 0]
                buf.add_segment(tid, toks, lp, iteration=it, policy_version=it,
                                finish_reason=None if (it == 0 and tid % 2) else "stop")
    return buf.pop_batch(iteration=1)


def test_composed_objective_matches_float64_reference():
    model = TinyLM()
    batch = _fill_buffer(model)
    assert batch.num_samples == 4 and batch.num_segments.tolist() == [1, 2, 1, 2]
    correct = batch.response_lengths % 2 == 0
    rewards = shaped_rewards(correct.float(), batch.response_lengths, correct, K, iteration=0,
                             cfg=LengthPenaltyConfig(weight=0.5, warmup_iterations=0))
    labels, mask = batch.input_ids[:, 1:], batch.loss_mask[:, 1:]
    trainer_lp = token_logprobs(model.hidden(batch.input_ids[:, :-1]), labels,
                                weight=model.out, chunk_size=3)
    drift = logprob_mismatch_metrics(batch.behaviour_logprobs[:, 1:], trainer_lp,
                                     batch.response_mask[:, 1:])
    assert drift["max_abs_diff"] < 1e-5 and drift["num_tokens"] == batch.response_lengths.sum()
    seq = sequence_logprobs(trainer_lp, mask)
    loss = mirror_descent_loss(seq, seq.detach() - 0.3, rewards, K, TAU, log_z="exact")
    loss.backward()

    # independent float64 reference of the same objective
    ref = TinyLM().double()
    h = ref.hidden(batch.input_ids[:, :-1])
    lp_all = torch.log_softmax(h @ ref.out.t(), -1).gather(-1, labels[..., None])[..., 0]
    seq64 = (lp_all * mask.double()).sum(-1)
    r = rewards.double().view(-1, K)
    b = (TAU * torch.log(torch.exp(r / TAU).mean(1))).repeat_interleave(K)
    resid = rewards.double() - b - TAU * 0.3  # seq - ref_seq = 0.3 for every sample
    surrogate = (-(resid.detach()) * seq64).sum() / 4  # d/dseq = -(r - b - tau d) / B
    surrogate.backward()
    pairs = [(model.out.grad, ref.out.grad), (model.mix.weight.grad, ref.mix.weight.grad),
             (model.embed.weight.grad, ref.embed.weight.grad)]
    for ours, theirs in pairs:
        assert torch.allclose(ours.double(), theirs, atol=1e-6, rtol=1e-5)
    assert model.out.grad.abs().sum() > 0
