"""``k15 plan``: verdicts, exit statuses and suggestions on the shipped recipes (in process)."""

from __future__ import annotations

import json
import os
import re

import pytest

from k15_megatron.cli import main as k15
from k15_megatron.plan.layout import Layout
from k15_megatron.plan.model_state import model_state
from k15_megatron.plan.rollout import kv_bytes_per_token
from public_configs import QWEN3_30B_A3B

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE_128K = os.path.join(REPO, "examples", "qwen2_5_7b_128k.yaml")
PLAN_LINE = re.compile(r"^PLAN fits=(yes|no) peak_gib=([0-9.]+) capacity_gib=([0-9.]+) params=(\d+)$")
COMMON = dict(model_type="qwen2", vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False)
QWEN2_5 = {
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, **COMMON),
    "Qwen2.5-72B": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, **COMMON),
}
"""The public config.json architecture keys of Qwen2.5-7B and Qwen2.5-72B."""


@pytest.fixture
def models(tmp_path, monkeypatch):
    for name, config in {**QWEN2_5, "Qwen3-30B-A3B": QWEN3_30B_A3B}.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("K15_MODELS", str(tmp_path))
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "K15_RUNS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def plan(capsys, *args):
    status = k15(["plan", *args])
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1] if out.strip() else ""
    match = PLAN_LINE.match(last)
    return status, out, err, match


@pytest.mark.parametrize("recipe,world,gpu", [("qwen2_5_7b_128k.yaml", 32, "h100-80gb"),
                                              ("qwen2_5_7b_128k_1node.yaml", 8, "h200-141gb"),
                                              ("qwen2_5_7b_32k.yaml", 8, "h100-80gb")])
def test_recipes_fit_their_clusters(models, capsys, recipe, world, gpu):
    status, out, _, match = plan(capsys, os.path.join(REPO, "examples", recipe), f"parallel.world_size={world}",
                                 "--gpu", gpu)
    assert status == 0 and match and match.group(1) == "yes", out
    assert int(match.group(4)) == 7_615_616_512
    assert float(match.group(2)) < float(match.group(3))
    assert "verdict: fits" in out


def test_72b_at_128k_on_one_node_with_tp1_is_refused_with_numbers(models, capsys):
    status, out, _, match = plan(capsys, RECIPE_128K, f"model.hf_path={models / 'Qwen2.5-72B'}",
                                 "parallel.world_size=8", "parallel.tensor=1", "parallel.sequence_parallel=false",
                                 "rollout.tensor_parallel_size=8")
    assert status == 1 and match and match.group(1) == "no", out
    params, peak, capacity = int(match.group(4)), float(match.group(2)), float(match.group(3))
    assert 72e9 < params < 73e9  # Qwen2.5-72B: 72.7B
    assert peak > capacity == pytest.approx(79.65, abs=0.01)
    assert re.search(r"verdict: does not fit: training step needs [0-9.]+ GiB with the reserve, [0-9.]+ GiB "
                     r"more than the 79.6 GiB GPU", out), out
    assert "smallest change that fits: none found" in out


def test_smallest_change_is_printed_and_fits(models, capsys):
    base = [RECIPE_128K, "parallel.world_size=32", "parallel.context=1", "parallel.recompute=none"]
    status, out, _, match = plan(capsys, *base)
    assert status == 1 and match.group(1) == "no"
    change = re.search(r"^smallest change that fits: (.+)$", out, re.M).group(1).split()
    assert change == ["parallel.context=8", "parallel.recompute=full"]
    status, out, _, match = plan(capsys, *base, *change)
    assert status == 0 and match.group(1) == "yes", out


def test_lower_utilization_is_suggested_for_the_switch(models, capsys):
    base = [os.path.join(REPO, "examples", "qwen2_5_7b_32k.yaml"), "parallel.world_size=8",
            "rollout.gpu_memory_utilization=0.92"]
    status, out, _, _ = plan(capsys, *base)
    assert status == 1 and "hybrid switch (vLLM awake) needs" in out, out
    change = re.search(r"^smallest change that fits: (.+)$", out, re.M).group(1)
    assert change == "rollout.gpu_memory_utilization=0.85"
    assert plan(capsys, *base, change)[0] == 0


def test_invalid_config_and_gpu_exit_2(models, capsys):
    status, out, err, _ = plan(capsys, RECIPE_128K, "parallel.world_size=32", "parallel.tensr=2")
    assert status == 2 and "parallel.tensr" in err and "PLAN" not in out
    status, _, err, _ = plan(capsys, RECIPE_128K, "parallel.world_size=32", "--gpu", "a100")
    assert status == 2 and "--gpu 'a100'" in err
    status, _, err, _ = plan(capsys, RECIPE_128K, "parallel.world_size=30")
    assert status == 2 and "does not divide the world size 30" in err


def test_model_state_bytes_follow_megatron():
    layout = Layout(tensor=1, pipeline=1, context=2, data=4, sequence_parallel=False, distributed_optimizer=False,
                    recompute="none", dtype="bf16", grad_reduce_in_fp32=True, optimizer="adam")
    state = model_state(1000, layout)
    assert (state.weights, state.gradients, state.master, state.moments) == (2000, 4000, 4000, 8000)
    sharded = model_state(1000, layout.replace(distributed_optimizer=True))  # over DP x CP = 8
    assert (sharded.gradients, sharded.master, sharded.moments) == (4000, 500, 1000)
    fp32 = model_state(1000, layout.replace(dtype="fp32", grad_reduce_in_fp32=False))
    assert (fp32.weights, fp32.gradients, fp32.master, fp32.moments) == (4000, 4000, 0, 8000)


def test_kv_bytes_per_token():
    from k15_megatron.config import ModelConfig, resolve_model_arch

    arch = resolve_model_arch(ModelConfig(family="qwen2", num_layers=28, hidden_size=3584, ffn_hidden_size=18944,
                                          num_attention_heads=28, num_query_groups=4, vocab_size=152064,
                                          max_position_embeddings=131072, norm_epsilon=1e-6))
    assert kv_bytes_per_token(arch, tensor_parallel=1, dtype_bytes=2) == 2 * 28 * 4 * 128 * 2
    assert kv_bytes_per_token(arch, tensor_parallel=4, dtype_bytes=2) == 2 * 28 * 1 * 128 * 2
    assert kv_bytes_per_token(arch, tensor_parallel=8, dtype_bytes=2) == 2 * 28 * 1 * 128 * 2  # replicated head


def test_plan_imports_no_torch(models):
    """The plan runs on a login node in a second: no torch, Megatron, vLLM or transformers."""
    import subprocess
    import sys

    code = ("import sys; from k15_megatron.cli import main; "
            f"rc = main(['plan', {RECIPE_128K!r}, 'parallel.world_size=32']); "
            "print([m for m in ('torch', 'megatron', 'vllm', 'transformers') if m in sys.modules], rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[] 0", out.stdout + out.stderr


def test_expert_optimizer_state_is_sharded_over_expert_data_parallel_ranks():
    layout = Layout(tensor=1, pipeline=1, context=2, data=4, sequence_parallel=False, distributed_optimizer=True,
                    recompute="none", dtype="bf16", grad_reduce_in_fp32=True, optimizer="adam", expert=4)
    assert layout.expert_data == 2  # DP x CP / EP
    state = model_state(1000, layout, expert_params=600)  # 400 dense over 8 ranks, 600 experts over 2
    assert (state.weights, state.gradients) == (2000, 4000)  # neither is sharded
    assert (state.master, state.moments) == (4 * 400 // 8 + 4 * 600 // 2, 8 * 400 // 8 + 8 * 600 // 2)
    assert model_state(1000, layout.replace(expert=1), expert_params=600) == model_state(1000, layout.replace(expert=1))


@pytest.mark.parametrize("recipe,context", [("qwen3_30b_a3b_rl.yaml", 1), ("qwen3_30b_a3b_rl_32k.yaml", 2)])
def test_qwen3_30b_a3b_recipes_fit_two_h100_nodes(models, capsys, recipe, context):
    status, out, _, match = plan(capsys, os.path.join(REPO, "examples", recipe), "parallel.world_size=16",
                                 "--gpu", "h100-80gb")
    assert status == 0 and match and match.group(1) == "yes", out
    assert int(match.group(4)) == 30_532_122_624
    assert f"TP 4 x PP 1 x CP {context} x DP {4 // context}, EP 4 (expert DP 1)" in out
    assert "128 experts (top 8) on 48 MoE layers" in out
    # 30.5B / 16 ranks: 1/16 of the experts and 1/4 of the rest (TP 4) on each GPU
    assert "2,206,808,064 parameters on this rank (1,811,939,328 in experts)" in out
    # vLLM's TP shards every expert: all 30.5B parameters / rollout TP 4, in bf16
    weights = re.search(r"vLLM share: weights ([0-9.]+) GiB", out).group(1)
    assert float(weights) == pytest.approx(30_532_122_624 * 2 / 4 / 1024 ** 3, abs=0.01)
