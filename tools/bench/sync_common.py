"""What the weight-sync benchmarks (weight_sync.py, moe_sync.py) share: the Megatron model built
from a Hugging Face folder, rounds of perturb-then-sync, the stream produced alone, and the
one-tensor-copy baseline. ``reduce`` turns a rank's seconds into the figure reported (identity in
one process; the slowest rank's time under several, see :func:`slowest_rank`); ``barrier`` lines
the ranks up before each timed copy or stream.
"""

from __future__ import annotations

import time


def build_megatron_model(hf_dir: str, parallel):
    """(arch, model): the float32 GPTModel of ``hf_dir`` under ``parallel`` (process groups already
    initialised), its weights loaded from the folder."""
    from k15_megatron.checkpoint.model_weights import load_hf_weights
    from k15_megatron.config import ModelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size

    arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
    padded = padded_vocab_size(arch.vocab_size, 128, parallel.tensor)
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                            padded_vocab=padded)
    load_hf_weights(model, hf_dir, arch, padded)
    return arch, model


def colocated_model_and_engine(hf_dir: str, parallel, make_folder):
    """Inside one rank of a 2-process run: start the parallel state of ``parallel``, let rank 0
    write the Hugging Face folder (``make_folder(hf_dir)``), build the Megatron model from it
    (:func:`build_megatron_model`) and one vLLM TP=2 CPU engine over both processes, as ``k15 rl``
    colocates them. Returns (arch, model, rollout engine); shut the engine down last (its
    teardown destroys the process-wide groups)."""
    from k15_megatron.config.rl import RepeatConfig
    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.parallel.initialize import barrier, global_rank, initialize
    from k15_megatron.rollout.engine import RolloutEngine

    initialize(parallel)
    if global_rank() == 0:
        make_folder(hf_dir)
    barrier()
    arch, model = build_megatron_model(hf_dir, parallel)
    rollout_cfg = RolloutConfig(tensor_parallel_size=2, max_response_tokens=16, max_model_len=128,
                                cpu_kv_cache_gib=0.25, max_num_seqs=4)
    rollout = RolloutEngine.create(rollout_cfg, model_path=hf_dir, repeat=RepeatConfig(enabled=False), seed=0)
    return arch, model, rollout


def run_on_two_ranks(args, rank_work) -> int:
    """``rank_work(args)`` in 2 processes started like every k15 command, library chatter hidden
    unless ``args.verbose``; returns the exit status."""
    from k15_megatron.jobs.verbosity import configure
    from k15_megatron.parallel.launch import run_as_ranks

    configure(verbose=args.verbose)
    return run_as_ranks(2, lambda: rank_work(args))


def slowest_rank(seconds: float) -> float:
    """The largest of every rank's ``seconds`` (an all-reduce MAX over the default group)."""
    import torch

    value = torch.tensor([seconds], dtype=torch.float64)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return float(value)


def sync_rounds(sync, model, arch, *, repeats: int, reduce=float, measure=None):
    """``repeats`` rounds of: every parameter += 1e-3 (new weights, as after a train step), then
    ``sync.sync(model, arch)``. ``measure(run)`` (optional) wraps each sync and returns a figure
    of it (e.g. :func:`k15_megatron.parallel.device.host_peak_rss_extra`). Returns (reduced sync
    seconds per round, measured figures per round, the last round's sync metrics)."""
    import torch

    seconds, figures, metrics = [], [], {}
    for _ in range(repeats):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1e-3)

        def run():
            metrics.update(sync.sync(model, arch))

        if measure is None:
            run()
        else:
            figures.append(measure(run))
        seconds.append(reduce(metrics["sync_s"]))
    return seconds, figures, metrics


def stream_seconds(model, arch, *, repeats: int, reduce=float, barrier=lambda: None) -> list[float]:
    """Seconds to produce the whole sync stream (mapping, fused-layout splits, experts gathered
    over EP) with vLLM's loader replaced by a consumer that only touches each tensor, per round."""
    import torch

    from k15_megatron.engine.weight_stream import iter_model_hf_tensors

    out = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        for _, tensor in iter_model_hf_tensors(model, arch, dtype=torch.float32):
            tensor.view(-1)[:1].sum()
        out.append(reduce(time.perf_counter() - start))
    return out


def copy_seconds(num_bytes: int, *, repeats: int, reduce=float, barrier=lambda: None) -> list[float]:
    """Seconds of one ``dst.copy_(src)`` of a flat float32 tensor of ``num_bytes``, per round: the
    lower bound for moving the weights once."""
    import torch

    src = torch.empty(num_bytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    out = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        dst.copy_(src)
        out.append(reduce(time.perf_counter() - start))
    return out
