"""The hybrid engine's memory steps on a real Megatron DDP model and optimizer (1 CPU process).

Each step really frees storage on CPU (``untyped_storage().nbytes() == 0`` afterwards), reports
``sum(numel * element_size)`` of what it freed, and ``restore()`` brings parameters and Adam's
moments back bit for bit (gradient buffers zeroed). The next training step after a round trip
equals, bit for bit, the step of a run that never freed anything. Dropping the state for
``rl.reset_optimizer`` reports the bytes of every state tensor and leaves the state empty.
With the distributed optimizer the parameters live in DDP's flat ``param_data`` buffers; that
branch is checked on a DDP model built with ``use_distributed_optimizer=True`` (the distributed
optimizer itself refuses CPU tensors).
"""

import pytest
import torch
from distributed import run_distributed
from tooling import megatron_from_hf


def _batch(vocab_size):
    tokens = torch.randint(3, vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(16).expand(2, -1)}]


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _round_trip_worker(rank, world_size, hf_dir, round_trip):
    from k15_megatron.engine import memory
    from k15_megatron.rl.optim_reset import optimizer_has_state, state_tensors
    from k15_megatron.train.step import train_step

    arch, _, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, seed=5, lr=1e-2)
    batch = _batch(arch.vocab_size)
    for _ in range(2):
        train_step(chunks, optimizer, scheduler, batch)
    params = [p for chunk in chunks for p in chunk.parameters()]
    grads = [buffer.grad_data for chunk in chunks for buffer in chunk.buffers]
    moments = [t for _, _, t in state_tensors(optimizer) if t.dim() > 0]
    out = {}
    if round_trip:
        before = [t.detach().clone() for t in params + moments]
        assert any(g.abs().sum() > 0 for g in grads)
        records = {"grad": memory.release_grad_buffers(chunks),
                   "optimizer": memory.offload_optimizer_states(optimizer),
                   "param": memory.offload_params(chunks)}
        out["reported"] = {name: r.nbytes for name, r in records.items()}
        out["expected"] = {"grad": _nbytes(grads), "optimizer": _nbytes(moments), "param": _nbytes(params)}
        out["storage_left"] = sum(t.untyped_storage().nbytes() for t in params + grads + moments)
        out["restored"] = {name: r.restore() for name, r in records.items()}
        out["bit_exact"] = all(torch.equal(a, b) for a, b in zip(before, params + moments))
        out["grads_zero"] = all(bool((g == 0).all()) for g in grads)
        out["sizes_back"] = sum(t.untyped_storage().nbytes() for t in params + grads + moments)
        out["sizes_expected"] = _nbytes(params + grads + moments)
    train_step(chunks, optimizer, scheduler, batch)
    out["after_step"] = [p.detach().clone() for p in params]
    if round_trip:
        out["state_bytes"] = _nbytes([t for _, _, t in state_tensors(optimizer)])
        out["dropped"] = memory.drop_optimizer_states(optimizer)
        out["has_state_after_drop"] = optimizer_has_state(optimizer)
        out["dropped_again"] = memory.drop_optimizer_states(optimizer)
    return out


@pytest.mark.distributed
def test_memory_steps_free_real_bytes_and_round_trip_bit_exactly(tiny_hf_dirs):
    hf_dir = tiny_hf_dirs["qwen2"]
    [trip] = run_distributed(_round_trip_worker, 1, hf_dir, True, timeout_s=300)
    [plain] = run_distributed(_round_trip_worker, 1, hf_dir, False, timeout_s=300)
    assert trip["reported"] == trip["expected"] == trip["restored"]
    assert all(v > 0 for v in trip["expected"].values())
    assert trip["storage_left"] == 0, "a step reported bytes it did not free"
    assert trip["bit_exact"] and trip["grads_zero"]
    assert trip["sizes_back"] == trip["sizes_expected"]
    # training after the round trip is the training of a run that never freed anything
    assert len(trip["after_step"]) == len(plain["after_step"])
    assert all(torch.equal(a, b) for a, b in zip(trip["after_step"], plain["after_step"]))
    # rl.reset_optimizer: everything held by the state goes (moments and step counters), once
    assert trip["dropped"] == trip["state_bytes"] > trip["expected"]["optimizer"]
    assert not trip["has_state_after_drop"] and trip["dropped_again"] == 0


def _param_buffer_worker(rank, world_size, hf_dir):
    from k15_megatron.checkpoint.model_weights import load_hf_weights
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.engine import memory
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.optimizer import wrap_ddp

    parallel, precision = ParallelConfig(), PrecisionConfig(dtype="fp32")
    initialize(parallel, seed=3)
    arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
    padded = padded_vocab_size(arch.vocab_size, 128, 1)
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=precision, padded_vocab=padded)
    load_hf_weights(model, hf_dir, arch, padded)
    chunk = wrap_ddp(model, precision_cfg=precision, use_distributed_optimizer=True)
    flat = [buffer.param_data for buffer in chunk.buffers]
    params = list(chunk.parameters())
    before = [p.detach().clone() for p in params]
    record = memory.offload_params([chunk])
    out = {"has_param_data": all(f is not None for f in flat), "reported": record.nbytes,
           "flat_bytes": _nbytes(flat), "param_bytes": _nbytes(params),
           "param_storage_left": sum(p.untyped_storage().nbytes() for p in params)}
    record.restore()
    out["bit_exact"] = all(torch.equal(a, p) for a, p in zip(before, params))
    out["views_kept"] = all(p.untyped_storage().data_ptr() == flat[0].untyped_storage().data_ptr() for p in params)
    return out


@pytest.mark.distributed
def test_offload_params_frees_the_flat_buffers_of_the_distributed_optimizer_layout(tiny_hf_dirs):
    [out] = run_distributed(_param_buffer_worker, 1, tiny_hf_dirs["qwen2"], timeout_s=300)
    assert out["has_param_data"]
    assert out["reported"] == out["flat_bytes"] >= out["param_bytes"] > 0
    assert out["param_storage_left"] == 0
    assert out["bit_exact"] and out["views_kept"]
