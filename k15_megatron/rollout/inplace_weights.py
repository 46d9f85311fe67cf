"""What a colocated vLLM engine's rank holds, and writing rank-local shards straight into it.

The tensor-parallel-aligned weight sync (:mod:`k15_megatron.engine.aligned_sync`) writes each
rank's own trainer shard into the matching parameter of the vLLM model in the same process,
without vLLM's checkpoint loader. This module owns the vLLM side of that:

* :func:`tensor_parallel_layout`: vLLM's tensor- and pipeline-parallel layout on this rank;
* :func:`local_param_specs`: for every parameter of the vLLM model, the kind of layer it
  belongs to and the rank-local slice of the full tensor it holds (derived from the layer's own
  attributes, the same ones its weight loaders use), or why it cannot be written directly;
* :func:`write_local`: one rank-local tensor into its parameter, in place;
* :func:`finish_layer`: the layer's post-load processing, which on the CPU backend re-packs
  linear weights for its GEMM kernel.

On the CPU backend (vLLM 0.32) an unquantized linear layer keeps its weight only inside a
pre-packed oneDNN (or SGL) kernel object: ``process_weights_after_loading`` packs the loaded
weight into memory the kernel owns and replaces ``layer.weight`` with an empty parameter. Writing
such a layer therefore means handing the new weight to the packing step: :func:`write_local`
puts the rank-local tensor in place of the empty parameter and :func:`finish_layer` drops the
old packed copy, then packs the new one (the kernel copies it; the tensor handed over is not
kept). Embedding and output layers keep their weight (``remove_weight=False``) and get an
in-place copy, then a re-pack of their GEMM copy. On GPU every weight is a plain tensor written
in place, and the unquantized layers' post-load processing does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# vLLM layer classes whose weights this module knows how to address (by class name: vLLM is
# imported only inside the engine's process, and subclasses with other layouts stay excluded).
_QKV = ("QKVParallelLinear",)
_MERGED = ("MergedColumnParallelLinear",)
_ROW = ("RowParallelLinear",)
_VOCAB = ("VocabParallelEmbedding", "ParallelLMHead")
_NORM = ("RMSNorm",)
_UNQUANTIZED = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")


@dataclass(frozen=True)
class ParamSpec:
    """One vLLM parameter as this rank holds it.

    Attributes:
        kind: "qkv" (rows [q; k; v] of this rank's heads), "merged" (rows [gate; up] of this
            rank's slices), "row" (columns ``tp_rank`` of ``tp_size`` equal chunks), "vocab"
            (rows ``vocab_start:vocab_end`` of the vocabulary, then zero rows up to
            ``shape[0]``), "replicated" (the whole tensor).
        shape: the parameter's rank-local shape before any CPU packing.
        num_heads / num_kv_heads / head_dim: this rank's heads ("qkv" only).
        vocab_start / vocab_end: this rank's vocabulary rows ("vocab" only).
    """

    kind: str
    shape: tuple[int, ...]
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_start: int = 0
    vocab_end: int = 0


def tensor_parallel_layout() -> tuple[int, int, list[int], int]:
    """vLLM's (tensor-parallel size, this rank's TP rank, global ranks of its TP group, pipeline
    size) in this process (its parallel state must be initialised, i.e. an engine created)."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    tp = get_tp_group()
    return tp.world_size, tp.rank_in_group, list(tp.ranks), get_pp_group().world_size


def _owner_modules(vllm_model) -> dict[str, torch.nn.Module]:
    """Parameter name (as ``named_parameters`` gives it, shared ones once) -> its module."""
    modules = dict(vllm_model.named_modules())
    return {name: modules[name.rpartition(".")[0]] for name, _ in vllm_model.named_parameters()}


def _logical_shape(module, param_name: str, param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape as loaded, before CPU packing may have emptied it."""
    if param_name == "weight" and hasattr(module, "input_size_per_partition"):
        return (sum(module.output_partition_sizes), module.input_size_per_partition)
    return tuple(param.shape)


def local_param_specs(vllm_model) -> tuple[dict[str, ParamSpec], dict[str, str]]:
    """(specs, refusals): for every parameter name of ``vllm_model`` the :class:`ParamSpec` of
    what this rank holds, or in ``refusals`` the reason it cannot be written directly (an
    unknown layer class, a quantisation method, replicated KV heads, an added vocabulary)."""
    specs, refusals = {}, {}
    for name, module in _owner_modules(vllm_model).items():
        pname = name.rpartition(".")[2]
        cls = type(module).__name__
        method = type(getattr(module, "quant_method", None)).__name__
        param = getattr(module, pname)
        if cls not in _NORM and method not in _UNQUANTIZED:
            refusals[name] = f"{cls} with quantisation method {method}"
            continue
        shape = _logical_shape(module, pname, param)
        if cls in _QKV:
            if module.num_kv_head_replicas != 1:
                refusals[name] = f"{module.num_kv_head_replicas} replicas of each KV head"
                continue
            specs[name] = ParamSpec("qkv", shape, num_heads=module.num_heads, num_kv_heads=module.num_kv_heads,
                                    head_dim=module.head_size)
        elif cls in _MERGED and len(module.output_sizes) == 2:
            specs[name] = ParamSpec("merged", shape)
        elif cls in _ROW and pname == "weight":
            specs[name] = ParamSpec("row", shape)
        elif cls in _VOCAB and pname == "weight":
            indices = module.shard_indices
            if indices.num_added_elements:
                refusals[name] = f"{cls} with {indices.num_added_elements} added vocabulary rows"
                continue
            specs[name] = ParamSpec("vocab", shape, vocab_start=indices.org_vocab_start_index,
                                    vocab_end=indices.org_vocab_end_index)
        elif cls in _NORM:
            specs[name] = ParamSpec("replicated", shape)
        else:
            refusals[name] = f"{cls}.{pname}: no rank-local layout known"
    return specs, refusals


def layers_of(vllm_model, param_names) -> dict[str, list[torch.nn.Module]]:
    """Parameter name -> every module holding that parameter object (a tied output layer shares
    the embedding's): the layers whose post-load processing must run after it is written.

    The input embedding is left out unless it is itself the output layer: on CPU its processing
    only rebuilds a packed GEMM copy of the table that nothing but an output layer uses (the
    lookup reads ``weight``, written in place): 14% of each rank's bytes in
    tools/bench/weight_sync.py's model, re-packed for nothing.
    """
    by_id = {id(p): n for n, p in vllm_model.named_parameters()}
    wanted = set(param_names)
    out: dict[str, list[torch.nn.Module]] = {n: [] for n in wanted}
    seen = set()
    output_layer = getattr(vllm_model, "lm_head", None)
    for module in vllm_model.modules():
        if id(module) in seen or (type(module).__name__ == "VocabParallelEmbedding" and module is not output_layer):
            continue
        seen.add(id(module))
        for param in module._parameters.values():
            name = by_id.get(id(param)) if param is not None else None
            if name in wanted:
                out[name].append(module)
    return out


def packed_away(module, param_name: str) -> bool:
    """True when the CPU backend packed this weight into its GEMM kernel and emptied the
    parameter (writing it means packing a new one: :func:`write_local`, :func:`finish_layer`)."""
    return param_name == "weight" and getattr(module, param_name).numel() == 0 and hasattr(module, "cpu_linear")


@torch.no_grad()
def write_local(module, param_name: str, tensor: torch.Tensor, *, num_rows: int | None = None) -> None:
    """Write ``tensor`` (this rank's slice in the parameter's loaded layout) into
    ``module.<param_name>``: in place (rows past ``num_rows`` zeroed, for vocabulary padding),
    or, for a weight the CPU backend packed away, as the tensor :func:`finish_layer` packs.
    The packed case may keep a reference to ``tensor`` until :func:`finish_layer` runs."""
    from vllm.platforms import current_platform

    param = getattr(module, param_name)
    if packed_away(module, param_name):
        if num_rows is not None and num_rows != tensor.shape[0]:
            raise ValueError(f"{type(module).__name__}.{param_name}: a packed weight takes whole tensors")
        if current_platform.is_zen_cpu():  # zentorch may use the weight without packing a copy
            tensor = tensor.clone()
        module.weight = torch.nn.Parameter(tensor, requires_grad=False)
        return
    rows = param.data if num_rows is None else param.data[:num_rows]
    rows.copy_(tensor)
    if num_rows is not None:
        param.data[num_rows:].zero_()


@torch.no_grad()
def finish_layer(module, sources: list[torch.Tensor]) -> None:
    """Run ``module``'s post-load processing after its weights were written (CPU: re-pack its
    GEMM weight; the old packed copy is dropped first so the two never coexist). ``sources``
    are tensors handed to :func:`write_local` that the layer must not keep (the trainer's
    parameters): a layer still holding one afterwards gets its own copy."""
    method = getattr(module, "quant_method", None)
    if method is None:
        return
    if hasattr(module, "cpu_linear"):
        del module.cpu_linear  # frees the old packed weight before the new one is made
    method.process_weights_after_loading(module)
    if hasattr(module, "update_param_tp_status"):
        module.update_param_tp_status()
    held = {t.untyped_storage().data_ptr() for t in sources}
    for name, param in list(module._parameters.items()):
        if param is not None and param.numel() and param.untyped_storage().data_ptr() in held:
            setattr(module, name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
