"""Tensor-parallel-aligned weight sync: each rank's Megatron shards straight into its vLLM shards.

When Megatron and the colocated vLLM engine shard the model over the same tensor-parallel ranks
(Megatron TP == vLLM TP on the same processes, in the same order, one pipeline stage: the
colocated default), every rank already holds the slice of each tensor its vLLM layers need. This
sync writes that slice into the vLLM parameter in place, with no collective (except the
vocabulary case below), no whole hub tensor and no pass through vLLM's checkpoint loader. What
differs between the two layouts is re-arranged locally, per tensor:

* ``linear_qkv`` (weight and Qwen2's bias): Megatron interleaves, per query group, the group's
  query heads, its key head and its value head; vLLM's ``qkv_proj`` holds this rank's query
  rows, then its key rows, then its value rows. Both give rank r the same groups, so the local
  re-layout is a reshape and three slices (one scratch tensor of the rank's QKV shard).
* ``linear_fc1``: Megatron's shard is [gate slice; up slice], exactly vLLM's merged
  ``gate_up_proj``; ``linear_proj`` / ``linear_fc2`` (row-parallel) and the norms (replicated,
  Qwen3's QK-norm included) map one to one.
* embedding / output layer: Megatron pads the vocabulary to a multiple of 128 x TP and vLLM to
  a multiple of 64, so the row ranges of a rank may differ. When every rank's vLLM rows lie
  inside its Megatron rows (e.g. a vocabulary of 32,000), they are a local slice; otherwise the
  tensor is all-gathered over Megatron's TP group and sliced (one whole tensor of scratch, for
  that tensor only). vLLM's padding rows are zeroed, as its loader does. Tied embeddings: the
  output layer shares the embedding's parameter and gets its post-load processing too.

After a layer's tensors are written, its post-load processing runs
(:func:`k15_megatron.rollout.inplace_weights.finish_layer`: on the CPU backend the re-packing of
linear weights for the GEMM kernel, which vLLM's reload also triggers). The write is the same
as vLLM's loader would have produced from the gathered stream, bit for bit
(tests/engine/test_aligned_sync.py).

:func:`build_plan` decides, once per model, whether the layouts are aligned (all ranks agree
through one all-reduce) and returns None with the reason otherwise: different TP sizes or
ranks, pipeline parallelism on either side, mixture-of-experts, multi-latent attention, vision
towers, quantised or unknown vLLM layers. The caller then falls back to the gathered stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from k15_megatron.checkpoint import hf_mapping
from k15_megatron.checkpoint.model_weights import gather_full_tensor, local_named_parameters
from k15_megatron.models.gpt import unwrap_model
from k15_megatron.parallel.device import collective_device
from k15_megatron.rollout import inplace_weights

# Hugging Face name pieces vLLM's Llama/Qwen models fuse into one parameter.
_FUSED = {**{f".self_attn.{x}_proj.": ".self_attn.qkv_proj." for x in "qkv"},
          **{f".mlp.{x}_proj.": ".mlp.gate_up_proj." for x in ("gate", "up")}}

_KIND_OF_SUFFIX = (("linear_qkv.weight", "qkv"), ("linear_qkv.bias", "qkv"), ("linear_fc1.weight", "merged"),
                   ("linear_proj.weight", "row"), ("linear_fc2.weight", "row"),
                   ("word_embeddings.weight", "vocab"), ("output_layer.weight", "vocab"))


@dataclass
class _Entry:
    megatron_name: str
    vllm_name: str
    spec: inplace_weights.ParamSpec


@dataclass
class AlignedPlan:
    """Which Megatron parameter goes into which vLLM parameter on this rank.

    Attributes:
        groups: per vLLM layer, in module order: (the layer's entries, every module whose
            post-load processing must run once they are written).
        gather_vocab: the vocabulary row ranges differ on some rank: embedding and output layer
            are all-gathered over Megatron's TP group (the same on every rank).
    """

    groups: list[tuple[list[_Entry], list[torch.nn.Module]]] = field(default_factory=list)
    gather_vocab: bool = False


def _vllm_name(hf_name: str) -> str:
    for piece, fused in _FUSED.items():
        hf_name = hf_name.replace(piece, fused)
    return hf_name


def _expected_kind(megatron_name: str) -> str:
    return next((kind for suffix, kind in _KIND_OF_SUFFIX if megatron_name.endswith(suffix)), "replicated")


def _megatron_layout():
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            list(torch.distributed.get_process_group_ranks(group)), ps.get_pipeline_model_parallel_world_size())


def _check_entry(entry: _Entry, param: torch.Tensor, arch, tp: int) -> str | None:
    """Why ``param`` (this rank's Megatron shard) cannot be written into ``entry``'s vLLM
    parameter as a local re-layout, or None."""
    spec, kind = entry.spec, _expected_kind(entry.megatron_name)
    if spec.kind != kind:
        return f"{entry.vllm_name} is a {spec.kind} parameter in vLLM, {kind} in Megatron"
    if kind == "qkv" and (spec.num_kv_heads * tp != arch.num_query_groups or spec.head_dim != arch.kv_channels
                          or spec.num_heads * tp != arch.num_attention_heads):
        return f"{entry.vllm_name}: vLLM's heads per rank differ from Megatron's query groups"
    if kind == "vocab":
        if spec.shape[1:] != tuple(param.shape[1:]):
            return f"{entry.vllm_name}: shape {spec.shape} vs Megatron's shard {tuple(param.shape)}"
    elif spec.shape != tuple(param.shape):
        return f"{entry.vllm_name}: shape {spec.shape} vs Megatron's shard {tuple(param.shape)}"
    return None


def _plan_locally(model, arch, vllm_model) -> tuple[AlignedPlan | None, str, bool]:
    """(plan, reason it is None, vocabulary rows of this rank inside its Megatron rows)."""
    if arch.is_moe or arch.is_mla or getattr(unwrap_model(model), "vision_arch", None) is not None:
        return None, "mixture-of-experts, multi-latent attention or vision models use the gathered stream", True
    tp, tp_rank, ranks, pp = _megatron_layout()
    vtp, vtp_rank, vranks, vpp = inplace_weights.tensor_parallel_layout()
    if (tp, tp_rank, ranks, pp) != (vtp, vtp_rank, vranks, 1) or vpp != 1:
        return None, (f"Megatron TP={tp} (ranks {ranks}) PP={pp} vs vLLM TP={vtp} (ranks {vranks}) "
                      f"PP={vpp}"), True
    specs, refusals = inplace_weights.local_param_specs(vllm_model)
    if refusals:
        name, why = next(iter(refusals.items()))
        return None, f"vLLM parameter {name}: {why}", True
    entries, vocab_inside = {}, True
    for name, param in local_named_parameters(model):
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        try:
            hf_names = hf_mapping.hf_names(name, arch)
        except hf_mapping.UnsupportedParameterError as exc:
            return None, str(exc), True
        for hf_name in hf_names:
            vname = _vllm_name(hf_name)
            if vname in entries and entries[vname].megatron_name == name:
                continue  # q/k/v (gate/up) of one Megatron tensor: one vLLM parameter
            if vname in entries:
                return None, f"Megatron {entries[vname].megatron_name} and {name} both map to {vname}", True
            if vname not in specs:
                return None, f"Megatron {name} has no vLLM parameter {vname}", True
            entry = entries[vname] = _Entry(name, vname, specs[vname])
            problem = _check_entry(entry, param, arch, tp)
            if problem:
                return None, problem, True
            if entry.spec.kind == "vocab":
                start = tp_rank * param.shape[0]
                vocab_inside &= start <= entry.spec.vocab_start and entry.spec.vocab_end <= start + param.shape[0]
    missing = sorted(set(specs) - set(entries))
    if missing:
        return None, f"vLLM parameters with no Megatron source: {missing[:4]}", True
    owners = inplace_weights.layers_of(vllm_model, entries)
    plan, by_module = AlignedPlan(), {}
    for vname, entry in entries.items():
        by_module.setdefault(vname.rpartition(".")[0], []).append(entry)
    for group in by_module.values():
        finishing = []
        for entry in group:
            finishing += [m for m in owners[entry.vllm_name] if all(m is not f for f in finishing)]
        plan.groups.append((group, finishing))
    return plan, "", vocab_inside


def build_plan(model, arch, vllm_model) -> tuple[AlignedPlan | None, str]:
    """(plan, "") when this rank's Megatron shards and vLLM parameters are TP-aligned on every
    rank, else (None, the first reason found on this rank, or "another rank is not aligned").
    Collective over the default group (one all-reduce): call it on every rank."""
    plan, reason, vocab_inside = _plan_locally(model, arch, vllm_model)
    flags = torch.tensor([plan is not None, vocab_inside], dtype=torch.int32, device=collective_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    if not bool(flags[0]):
        return None, reason or "another rank is not aligned"
    plan.gather_vocab = not bool(flags[1])
    return plan, ""


def _qkv_local(shard: torch.Tensor, spec: inplace_weights.ParamSpec) -> torch.Tensor:
    """Megatron's grouped QKV rows of this rank (weight [rows, H] or bias [rows]) -> vLLM's
    [q; k; v] rows of this rank."""
    groups, d = spec.num_kv_heads, spec.head_dim
    per_group = spec.num_heads // groups
    tail = shard.shape[1:]
    q, k, v = shard.reshape(groups, (per_group + 2) * d, *tail).split([per_group * d, d, d], dim=1)
    return torch.cat([q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)], dim=0)


def local_tensor(entry: _Entry, shard: torch.Tensor, *, gather_vocab: bool) -> tuple[torch.Tensor, int | None]:
    """(tensor, rows): what ``entry``'s vLLM parameter holds on this rank, made from this
    rank's Megatron ``shard``: the whole parameter (rows None), or for the vocabulary its first
    ``rows`` rows (the rest is zero padding). May be ``shard`` itself or a view of it.
    With ``gather_vocab`` a vocabulary tensor is all-gathered over the TP group (collective)."""
    spec = entry.spec
    if spec.kind == "qkv":
        return _qkv_local(shard, spec), None
    if spec.kind != "vocab":
        return shard, None
    if gather_vocab:
        return gather_full_tensor(entry.megatron_name, shard)[spec.vocab_start: spec.vocab_end], \
            spec.vocab_end - spec.vocab_start
    from megatron.core import parallel_state as ps

    offset = ps.get_tensor_model_parallel_rank() * shard.shape[0]
    return shard[spec.vocab_start - offset: spec.vocab_end - offset], spec.vocab_end - spec.vocab_start


def iter_local_tensors(plan: AlignedPlan, model, *, dtype: torch.dtype | None = None):
    """Yield ``(finishing modules, [(entry, tensor, rows, source)])`` per vLLM layer in
    ``plan``: each entry's rank-local tensor (:func:`local_tensor`, cast to ``dtype``) and the
    Megatron parameter it came from. Collective only when ``plan.gather_vocab``."""
    params = dict(local_named_parameters(model))
    for group, finishing in plan.groups:
        written = []
        for entry in group:
            source = params[entry.megatron_name].detach()
            tensor, rows = local_tensor(entry, source, gather_vocab=plan.gather_vocab)
            written.append((entry, tensor if dtype is None else tensor.to(dtype), rows, source))
        yield finishing, written


@torch.no_grad()
def sync_aligned(plan: AlignedPlan, model, vllm_model, *, dtype: torch.dtype) -> dict:
    """Write every Megatron shard of ``model`` into ``vllm_model`` per ``plan``, layer by layer,
    each layer's post-load processing right after it. Returns {"bytes": bytes written on this
    rank, "tensors": parameters written, "pack_s": seconds in the layers' post-load processing
    (the CPU backend's re-packing)}. Peak scratch: one layer's re-laid-out QKV shard (and, with
    ``plan.gather_vocab``, one whole vocabulary tensor)."""
    modules = dict(vllm_model.named_modules())
    num_bytes = num_tensors = 0
    pack_s = 0.0
    for finishing, written in iter_local_tensors(plan, model, dtype=dtype):
        for entry, tensor, rows, _ in written:
            module_name, _, pname = entry.vllm_name.rpartition(".")
            inplace_weights.write_local(modules[module_name], pname, tensor, num_rows=rows)
            num_bytes += tensor.numel() * tensor.element_size()
            num_tensors += 1
        start = time.perf_counter()
        for module in finishing:
            inplace_weights.finish_layer(module, [source for *_, source in written])
        pack_s += time.perf_counter() - start
    return {"bytes": num_bytes, "tensors": num_tensors, "pack_s": pack_s}
