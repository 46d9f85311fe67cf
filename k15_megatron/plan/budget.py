"""The memory of a job's phases on its fullest GPU, from a validated config.

``k15 rl`` (colocated, :mod:`k15_megatron.engine.hybrid`) has two peaks:

* the training step (vLLM asleep: level 1 moves its weights to the host and drops the KV
  cache, so it is counted as 0): weights, gradient buffers, optimizer states, the activations
  of the micro-batches in flight on the stage (1F1B: PP - stage of them, at most the step's
  micro-batches), then at the start of
  the backward either the log-prob head's peak (last stage) or one layer's backward transient;
* the hybrid switch (``to_rollout``): vLLM wakes up and takes its whole reservation while the
  trainer still holds its weights, its fp32 master copies, the gradient buffers unless
  ``engine.offload_grad_buffers`` and the moments unless ``rl.reset_optimizer`` drops them or
  ``engine.offload_optimizer_states`` moves them; the weight sync adds one gathered tensor
  (the largest, the embedding) and, under PP, one ``engine.sync_bucket_mb`` bucket.

``k15 sft`` has the training step only. Every GPU also keeps :data:`RUNTIME_RESERVE_BYTES`
for the CUDA context, NCCL and allocator fragmentation (an assumption, not a measurement).

The last stage's loss: ``k15 rl`` forms float32 logits ``rl.logprob_chunk_tokens`` at a time
(:mod:`k15_megatron.rl.logprobs`); ``k15 sft`` uses Megatron's cross entropy on the whole
[tokens, V/TP] logits.

A micro-batch's tokens are its worst case: RL, ``rl.groups_per_micro_batch`` x
``rl.group_size`` responses that all reach ``rollout.max_model_len``; SFT,
``data.micro_batch_size`` x ``data.seq_length``. CP ranks hold 1/CP of them each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from k15_megatron.config.model_arch import ModelArch
from k15_megatron.plan import activations
from k15_megatron.plan.activations import Kernels
from k15_megatron.plan.layout import Layout
from k15_megatron.plan.model_state import model_state
from k15_megatron.config.moe_arch import moe_layer_indices
from k15_megatron.plan.params import count_parameters, stage_layer_counts, stage_layer_ranges, stage_parameters
from k15_megatron.plan.rollout import RolloutShare, rollout_share

GIB = 1024 ** 3
RUNTIME_RESERVE_BYTES = 3 * GIB
"""Per GPU, outside the tensors counted: CUDA context, NCCL buffers, cuBLAS workspaces and the
caching allocator's fragmentation (assumed, not measured)."""


@dataclass(frozen=True)
class Line:
    """One row of a phase: what, bytes, how it was counted."""

    name: str
    num_bytes: int
    note: str = ""


@dataclass(frozen=True)
class Phase:
    """The tensors that coexist at one moment of a job on one GPU."""

    name: str
    lines: Tuple[Line, ...]

    @property
    def total(self) -> int:
        return sum(line.num_bytes for line in self.lines)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of one config on one GPU model (bytes)."""

    num_params: int
    layout: Layout
    micro_batch_tokens: int
    local_tokens: int
    layer_activation_bytes: int
    """One layer's kept activations for one micro-batch on one rank (no recompute; the larger
    of a dense and an MoE layer)."""
    phases: Tuple[Phase, ...]
    """Each phase on the pipeline stage where it is largest (named in the phase under PP)."""
    rollout: Optional[RolloutShare]
    capacity: int
    reserve: int = RUNTIME_RESERVE_BYTES

    @property
    def peak(self) -> int:
        return max(p.total for p in self.phases) + self.reserve

    @property
    def problems(self) -> List[str]:
        """Why it does not fit (empty when it fits)."""
        found = []
        if self.peak > self.capacity:
            worst = max(self.phases, key=lambda p: p.total)
            found.append(f"{worst.name} needs {self.peak / GIB:.1f} GiB with the reserve, "
                         f"{(self.peak - self.capacity) / GIB:.1f} GiB more than the "
                         f"{self.capacity / GIB:.1f} GiB GPU")
        if self.rollout is not None and self.rollout.full_length_sequences < 1:
            r = self.rollout
            found.append(f"vLLM's KV cache ({max(r.kv_cache, 0) / GIB:.1f} GiB = {r.kv_tokens} tokens) "
                         f"cannot hold one rollout.max_model_len={r.max_model_len} sequence "
                         f"({r.max_model_len * r.kv_bytes_per_token / GIB:.1f} GiB): vLLM would "
                         "refuse to start")
        return found

    @property
    def fits(self) -> bool:
        return not self.problems


def padded_vocab(vocab_size: int, divisible_by: int) -> int:
    """The embedding rows Megatron allocates (models.gpt.padded_vocab_size)."""
    return -(-vocab_size // divisible_by) * divisible_by


def micro_batch_tokens(cfg, *, job: str) -> int:
    """Worst-case tokens of one micro-batch (all ranks of a CP group together). RL packs whole
    groups: at most ``rl.groups_per_micro_batch`` of them, and no more than the token budget
    ``data.micro_batch_tokens`` allows, except that one group always runs (k responses of up
    to ``rollout.max_model_len`` tokens)."""
    if job == "sft":
        return cfg.data.micro_batch_size * cfg.data.seq_length
    group = cfg.rl.group_size * cfg.rollout.max_model_len
    worst = cfg.rl.groups_per_micro_batch * group
    budget = cfg.data.micro_batch_tokens
    return worst if budget is None else min(worst, max(budget, group))


def micro_batches_per_step(cfg, layout: Layout, *, job: str) -> int:
    """Micro-batches one data-parallel rank runs per optimizer step (at least 1): RL, its
    groups (``rl.prompts_per_iteration`` / ``rl.updates_per_iteration`` / DP) in micro-batches
    of ``rl.groups_per_micro_batch``; SFT, ``data.global_batch_size`` / (micro batch x DP)."""
    if job == "sft":
        return max(1, cfg.data.global_batch_size // (cfg.data.micro_batch_size * layout.data))
    groups = cfg.rl.prompts_per_iteration // (cfg.rl.updates_per_iteration * layout.data)
    return max(1, -(-groups // cfg.rl.groups_per_micro_batch))


def plan_memory(cfg, arch: ModelArch, layout: Layout, *, capacity: int, job: str = "rl",
                kernels: Kernels = activations.TE) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``cfg`` (a validated ExperimentConfig; ``arch`` its
    resolved model) under ``layout`` on a GPU of ``capacity`` bytes, for ``job`` rl | sft."""
    vocab = padded_vocab(arch.vocab_size, cfg.model.make_vocab_size_divisible_by)
    tokens = micro_batch_tokens(cfg, job=job)
    local = -(-tokens // layout.context)
    counts = stage_layer_counts(num_layers=arch.num_layers, pipeline=layout.pipeline,
                                first=layout.first_stage_layers, last=layout.last_stage_layers)
    num_params = count_parameters(arch)
    share = None
    if job == "rl":
        share = rollout_share(arch, cfg.rollout, num_params=num_params, capacity=capacity,
                              train_dtype_bytes=layout.dtype_bytes)
    per_stage = [_stage_phases(cfg, arch, layout, kernels, stage=stage, layers=layers,
                               local=local, vocab=vocab, share=share)
                 for stage, layers in enumerate(stage_layer_ranges(counts))]
    worst = []  # each phase on the stage where it is largest
    for i in range(len(per_stage[0])):
        stage = max(range(len(per_stage)), key=lambda st: per_stage[st][i].total)
        phase = per_stage[stage][i]
        name = f"{phase.name} (stage {stage})" if layout.pipeline > 1 else phase.name
        worst.append(Phase(name, phase.lines))
    num_moe = len(moe_layer_indices(arch))
    kinds = [sparse for sparse, n in ((False, arch.num_layers - num_moe), (True, num_moe)) if n]
    no_recompute = layout.replace(recompute="none")
    layer = int(max(activations.layer_bytes_per_token(arch, no_recompute, kernels, sparse=sparse)
                    for sparse in kinds) * local)
    return MemoryPlan(num_params=num_params, layout=layout, micro_batch_tokens=tokens,
                      local_tokens=local, layer_activation_bytes=layer, phases=tuple(worst), rollout=share,
                      capacity=capacity)


def _stage_phases(cfg, arch, layout, kernels, *, stage, layers: range, local, vocab, share):
    last = stage == layout.pipeline - 1
    params = stage_parameters(arch, stage=stage, pipeline=layout.pipeline, tensor=layout.tensor,
                              layers=layers, padded_vocab=vocab, expert=layout.expert)
    state = model_state(params.total, layout, expert_params=params.experts)
    num_moe = len(set(layers) & set(moe_layer_indices(arch)))
    in_flight = min(layout.pipeline - stage, micro_batches_per_step(cfg, layout, job="rl" if share else "sft"))
    sequence = cfg.rollout.max_model_len if share is not None else cfg.data.seq_length
    stored = activations.stored_bytes(arch, layout, kernels, num_layers=len(layers), tokens=local,
                                      last_stage=last, in_flight=in_flight, sequence_tokens=sequence,
                                      num_moe_layers=num_moe)
    transient = activations.backward_transient_bytes(arch, layout, tokens=local, dense=num_moe < len(layers),
                                                     moe=num_moe > 0)
    opt_note = "sharded over DP x CP" if layout.distributed_optimizer else "not sharded"
    if layout.distributed_optimizer and params.experts:
        opt_note += f", experts over DP x CP / EP = {layout.expert_data}"
    held = f"{params.total:,} parameters on this rank"
    if params.experts:
        held += f" ({params.experts:,} in experts)"
    lines = [Line("weights", state.weights, held),
             Line("gradient buffers", state.gradients, "DDP main_grad"),
             Line("optimizer: fp32 master copies", state.master, opt_note),
             Line("optimizer: moments", state.moments, opt_note),
             Line("activations", stored,
                  f"{in_flight} micro-batch(es) of {local:,} tokens, recompute={layout.recompute}")]
    if last and share is not None:  # k15 rl: the chunked log-prob head
        head = activations.logprob_peak_bytes(arch, layout, tokens=local,
                                              chunk_tokens=cfg.rl.logprob_chunk_tokens,
                                              padded_vocab=vocab)
        lines.append(Line("log-prob head backward", max(head, transient),
                          f"[{min(cfg.rl.logprob_chunk_tokens, local)}, V/TP] float32 chunks"))
    elif last:  # k15 sft: Megatron's cross entropy on the whole logits
        head = activations.labels_loss_peak_bytes(arch, layout, tokens=local, padded_vocab=vocab)
        lines.append(Line("logits + cross entropy", max(head, transient), "[tokens, V/TP] logits"))
    else:
        lines.append(Line("backward transient", transient,
                          "one [k tokens, f_e/TP] gradient" if num_moe else "one [tokens, f/TP] gradient"))
    phases = [Phase("training step", tuple(lines))]
    if share is not None:
        phases.append(_switch_phase(cfg, arch, layout, state, share, vocab))
    return tuple(phases)


def _switch_phase(cfg, arch, layout, state, share: RolloutShare, vocab: int) -> Phase:
    engine = cfg.engine
    lines = [Line("weights", state.weights), Line("optimizer: fp32 master copies", state.master)]
    if not engine.offload_grad_buffers:
        lines.append(Line("gradient buffers", state.gradients, "engine.offload_grad_buffers=false"))
    if not cfg.rl.reset_optimizer and not engine.offload_optimizer_states:
        lines.append(Line("optimizer: moments", state.moments, "kept on the GPU"))
    gathered = vocab * arch.hidden_size * layout.dtype_bytes
    bucket = engine.sync_bucket_mb * 1024 ** 2 if layout.pipeline > 1 else 0
    lines.append(Line("weight sync buffers", gathered + bucket, "one gathered embedding"
                      + (" + one PP bucket" if bucket else "")))
    lines.append(Line("vLLM reservation", share.reserved,
                      f"rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization}"))
    return Phase("hybrid switch (vLLM awake)", tuple(lines))
