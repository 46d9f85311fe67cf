"""The strict device mode catches a host tensor where a GPU run needs a device tensor.

Each test runs the package's real code in ranks started by tests/distributed.py (strict mode on,
as for every rank the suite starts), first as shipped (it must pass), then with one host tensor
deliberately put back (it must fail with StrictDeviceError naming the place):

* at a collective: the preemption flag's all-reduce with its flag built on the host;
* at Megatron's forward input: an SFT step whose micro-batches skip the device seam;
* at an operation: an SFT step whose loss mask stays on the host inside the loss.
"""

import pytest
import torch
from distributed import run_distributed
from tooling import megatron_from_hf

from k15_megatron.parallel import device


def _expect_strict_error(fn) -> str:
    from k15_megatron.parallel.strict_device import StrictDeviceError

    try:
        fn()
    except StrictDeviceError as exc:
        return str(exc)
    raise AssertionError("the host tensor was not caught")


def _rules_worker(rank, world_size):
    """Placement rules on plain tensors, through a package function (rl.loss.sequence_logprobs)."""
    from k15_megatron.config import ParallelConfig
    from k15_megatron.parallel import strict_device
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.rl.loss import sequence_logprobs

    initialize(ParallelConfig(), seed=1)
    on_device = torch.randn(2, 5, device=device.compute_device())
    host_mask = torch.ones(2, 5)
    placed = {
        "enabled": strict_device.enabled(),
        "factory_without_device": strict_device.is_host(torch.zeros(3)),
        "factory_on_compute_device": strict_device.is_host(torch.zeros(3, device=device.compute_device())),
        "factory_on_a_tensors_device": strict_device.is_host(torch.zeros(3, device=on_device.device)),
        "moved_by_the_seam": strict_device.is_host(device.to_device({"x": host_mask})["x"]),
        "cpu_copy": strict_device.is_host(on_device.cpu()),
        "result_of_device_and_0dim_host": strict_device.is_host(on_device * torch.tensor(2.0)),
        # Other devices keep their own name (transformers builds models on "meta" first).
        "meta_stays_meta": torch.empty(2, device="meta").device.type == "meta",
    }
    ok = sequence_logprobs(on_device, device.to_device(host_mask))
    placed["device_inputs_pass"] = not strict_device.is_host(ok)
    placed["error"] = _expect_strict_error(lambda: sequence_logprobs(on_device, host_mask))
    return placed


@pytest.mark.distributed
@pytest.mark.skipif(device.HAVE_CUDA, reason="the strict mode simulates a GPU on CPU-only machines")
def test_placement_rules():
    (placed,) = run_distributed(_rules_worker, 1)
    assert placed.pop("enabled"), "ranks started by the tests must run in the strict device mode"
    error = placed.pop("error")
    assert placed == {"factory_without_device": True, "factory_on_compute_device": False,
                      "factory_on_a_tensors_device": False, "moved_by_the_seam": False, "cpu_copy": True,
                      "result_of_device_and_0dim_host": False, "meta_stays_meta": True,
                      "device_inputs_pass": True}
    assert "torch.where mixes a host tensor (10,) bool" in error and "rl/loss.py" in error  # the [2, 5] mask, flattened


def _collective_worker(rank, world_size):
    from k15_megatron.config import ParallelConfig
    from k15_megatron.jobs import preemption
    from k15_megatron.parallel.initialize import initialize

    initialize(ParallelConfig(), seed=1)
    flag = preemption.PreemptionFlag()
    as_shipped = flag.requested()
    # Put the host tensor back: the flag built where collective_device() says "cpu".
    preemption.collective_device = lambda group=None: torch.device("cpu")
    error = _expect_strict_error(flag.requested)
    flag.restore()
    return as_shipped, error


@pytest.mark.distributed
@pytest.mark.skipif(device.HAVE_CUDA, reason="the strict mode simulates a GPU on CPU-only machines")
def test_host_tensor_at_a_collective_fails():
    for as_shipped, error in run_distributed(_collective_worker, 2):
        assert as_shipped is False
        assert "torch.distributed.all_reduce got a host tensor (1,) int32" in error
        assert "jobs/preemption.py" in error


def _sft_rows(vocab_size: int):
    from k15_megatron.data.packing import pack_examples
    from k15_megatron.jobs.sft import sft_micro_batches

    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(5, vocab_size, (n,), generator=g).tolist(),
                 torch.randint(5, vocab_size, (m,), generator=g).tolist()) for n, m in ((4, 6), (7, 3), (2, 9), (5, 5))]
    return sft_micro_batches(pack_examples(examples, seq_length=24, pad_id=0), micro_batch_size=1, multiple=1)


def _forward_worker(rank, world_size, hf_dir):
    from k15_megatron.train import schedule
    from k15_megatron.train.step import masked_token_loss, train_step

    arch, _, chunks, optimizer, scheduler = megatron_from_hf(hf_dir, seed=3, lr=1e-3)
    micro_batches = _sft_rows(arch.vocab_size)
    as_shipped = train_step(chunks, optimizer, scheduler, micro_batches)["loss"]

    def host_mask_loss(mb, token_loss):
        return masked_token_loss({**mb, "loss_mask": mb["loss_mask"].cpu()}, token_loss)

    op_error = _expect_strict_error(lambda: train_step(chunks, optimizer, scheduler, micro_batches,
                                                       loss_fn=host_mask_loss))
    # Put the host tensors back: micro-batches handed to Megatron without the device seam.
    schedule.to_device = lambda tree: tree
    forward_error = _expect_strict_error(lambda: train_step(chunks, optimizer, scheduler, micro_batches))
    return as_shipped, op_error, forward_error


@pytest.mark.distributed
@pytest.mark.skipif(device.HAVE_CUDA, reason="the strict mode simulates a GPU on CPU-only machines")
def test_host_tensor_at_megatron_forward_or_in_the_loss_fails(tiny_hf_dirs):
    ((loss, op_error, forward_error),) = run_distributed(_forward_worker, 1, tiny_hf_dirs["qwen2"])
    assert 0 < loss < 20
    assert "mixes a host tensor (1, 20) float32" in op_error and "train/step.py" in op_error
    assert "GPTModel.forward got input_ids as a host tensor (1, 20) int64" in forward_error
    assert "train/schedule.py" in forward_error
