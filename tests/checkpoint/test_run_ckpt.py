"""Run checkpoints: exact continuation, pointer fallbacks, and a crash while writing."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from distributed import run_distributed
from tooling import megatron_from_hf

from k15_megatron.checkpoint.run_ckpt import (LATEST, find_resume_checkpoint, is_complete,
                                              iteration_dir_name)


def _setup(hf_dir, tp):
    return megatron_from_hf(hf_dir, tp=tp, seed=3, lr=1e-2)


def _step(arch, chunks, optimizer, scheduler):
    from k15_megatron.train.step import train_step

    # Data drawn from torch's global RNG: an exact resume must restore it.
    tokens = torch.randint(0, arch.vocab_size, (2, 17))
    batch = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(16).expand(2, -1)}]
    return train_step(chunks, optimizer, scheduler, batch)["loss"]


def _resume_worker(rank, world_size, hf_dir, save_dir):
    from k15_megatron.checkpoint.run_ckpt import load_run_checkpoint, save_run_checkpoint

    arch, model, chunks, optimizer, scheduler = _setup(hf_dir, tp=world_size)
    for _ in range(2):
        _step(arch, chunks, optimizer, scheduler)
    save_run_checkpoint(save_dir, 2, model_chunks=chunks, optimizer=optimizer,
                        run_state={"iteration": 2, "scheduler": scheduler.state_dict()},
                        rank_state={"marker": rank})
    uninterrupted = [_step(arch, chunks, optimizer, scheduler) for _ in range(2)]
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    # A fresh model and optimizer, then continue from the checkpoint.
    torch.manual_seed(12345)  # disturb every RNG: the checkpoint must restore them
    arch, model, chunks, optimizer, scheduler = _setup(hf_dir, tp=world_size)
    run_state, rank_state = load_run_checkpoint(os.path.join(save_dir, iteration_dir_name(2)),
                                                model_chunks=chunks, optimizer=optimizer)
    scheduler.load_state_dict(run_state["scheduler"])
    resumed = [_step(arch, chunks, optimizer, scheduler) for _ in range(2)]
    same = all(torch.equal(p, final[n]) for n, p in model.named_parameters())
    return {"uninterrupted": uninterrupted, "resumed": resumed, "weights_equal": same,
            "rank_state": rank_state, "iteration": run_state["iteration"]}


@pytest.mark.distributed
def test_resume_continues_bit_for_bit_under_tp2(tiny_hf_dirs, tmp_path):
    for rank, r in enumerate(run_distributed(_resume_worker, 2, tiny_hf_dirs["qwen3"], str(tmp_path))):
        assert r["resumed"] == r["uninterrupted"], f"rank {rank}: losses differ after resume"
        assert r["weights_equal"], f"rank {rank}: weights differ after resume"
        assert r["rank_state"] == {"marker": rank} and r["iteration"] == 2
    assert is_complete(str(tmp_path / iteration_dir_name(2)))
    assert open(tmp_path / LATEST).read().strip() == iteration_dir_name(2)


def _fake_complete(save_dir, iteration):
    path = save_dir / iteration_dir_name(iteration)
    path.mkdir(parents=True)
    (path / "run_state.pt").write_bytes(b"x")
    (path / "k15_meta.json").write_text('{"format": "k15-megatron-run", "iteration": %d}' % iteration)
    return path


def test_pointer_to_an_incomplete_checkpoint_falls_back_with_a_warning(tmp_path):
    _fake_complete(tmp_path, 3)
    (tmp_path / iteration_dir_name(5)).mkdir()  # a crash left it without metadata
    (tmp_path / LATEST).write_text(iteration_dir_name(5))
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / iteration_dir_name(3))


def test_garbled_pointer_falls_back_and_nothing_to_fall_back_to_is_an_error(tmp_path):
    _fake_complete(tmp_path, 4)
    (tmp_path / LATEST).write_bytes(b"\xff\xfe garbage")
    with pytest.warns(UserWarning):
        assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / iteration_dir_name(4))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LATEST).write_text("iter_0000009")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        find_resume_checkpoint(str(empty))
    assert find_resume_checkpoint(str(tmp_path / "never_written")) is None


_SAVE_FOREVER = r"""
import os, sys, time, torch
sys.path[:0] = [os.path.join({root!r}, "tests"), os.path.join({root!r}, "tests", "checkpoint")]
from k15_megatron.checkpoint import run_ckpt
from test_run_ckpt import _setup, _step
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT={port!r})
arch, model, chunks, optimizer, scheduler = _setup({hf!r}, tp=1)
_step(arch, chunks, optimizer, scheduler)
run_ckpt.save_run_checkpoint({save!r}, 1, model_chunks=chunks, optimizer=optimizer, run_state={{}}, rank_state={{}})
original_save = torch.save
def slow_save(obj, path, *a, **k):  # stretch the write so the parent can kill us inside it
    original_save(obj, path, *a, **k)
    if str(path).endswith("run_state.pt"):
        print("WRITING", flush=True)
        time.sleep(60)
run_ckpt.torch.save = slow_save
run_ckpt.save_run_checkpoint({save!r}, 2, model_chunks=chunks, optimizer=optimizer, run_state={{}}, rank_state={{}})
"""


@pytest.mark.distributed
def test_kill_during_checkpoint_write_leaves_latest_on_a_complete_checkpoint(tiny_hf_dirs, tmp_path):
    from distributed import free_port

    from tooling import REPO_ROOT

    save = tmp_path / "ckpts"
    script = _SAVE_FOREVER.format(root=REPO_ROOT, hf=tiny_hf_dirs["qwen3"], save=str(save), port=str(free_port()))
    # Its own process group: the kill takes the checkpoint writer's helper processes with it, as
    # the k15 launcher and Slurm do (a rank's helpers outlive a SIGKILL of the rank alone).
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            process_group=0)
    try:
        deadline = time.time() + 240
        line = ""
        while time.time() < deadline and "WRITING" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"saver exited early: {proc.stderr.read()[-3000:]}")
        assert "WRITING" in line
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (save / (iteration_dir_name(2) + ".tmp")).exists(), "the kill should have hit the second save"
    assert open(save / LATEST).read().strip() == iteration_dir_name(1)
    assert find_resume_checkpoint(str(save)) == str(save / iteration_dir_name(1))


def _empty_optimizer_worker(rank, world_size, hf_dir, save_dir):
    from k15_megatron.checkpoint.run_ckpt import load_run_checkpoint, save_run_checkpoint
    from k15_megatron.rl.optim_reset import reset_optimizer_state

    arch, model, chunks, optimizer, scheduler = _setup(hf_dir, tp=world_size)
    _step(arch, chunks, optimizer, scheduler)
    reset_optimizer_state(optimizer)  # as at the start of an RL iteration with nothing to train
    save_run_checkpoint(save_dir, 1, model_chunks=chunks, optimizer=optimizer, run_state={"iteration": 1},
                        rank_state={})
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    arch, model, chunks, optimizer, scheduler = _setup(hf_dir, tp=world_size)
    load_run_checkpoint(os.path.join(save_dir, iteration_dir_name(1)), model_chunks=chunks, optimizer=optimizer)
    return all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


@pytest.mark.distributed
def test_checkpoint_of_a_reset_optimizer_loads(tiny_hf_dirs, tmp_path):
    assert all(run_distributed(_empty_optimizer_worker, 2, tiny_hf_dirs["qwen3"], str(tmp_path)))
