"""The phases of k15_megatron.plan.budget: pipeline micro-batches in flight, CP split, switch."""

from __future__ import annotations

import json

import pytest

from k15_megatron.config import load_config, resolve_model_arch
from k15_megatron.plan import activations
from k15_megatron.plan.budget import plan_memory
from k15_megatron.plan.layout import layout_from_config

SMALL = dict(model_type="qwen2", hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=8192, rms_norm_eps=1e-6,
             tie_word_embeddings=False, hidden_act="silu")


def _plan(tmp_path, *overrides):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    cfg = load_config(None, [f"model.hf_path={tmp_path}", "rollout.max_model_len=8192", "rl.group_size=2",
                             "rl.prompts_per_iteration=8", *overrides], environ={})
    arch = resolve_model_arch(cfg.model)
    layout = layout_from_config(cfg, world_size=cfg.parallel.world_size)
    return cfg, arch, layout, plan_memory(cfg, arch, layout, capacity=80 * 1024 ** 3)


def _line(phase, name):
    return next(line.num_bytes for line in phase.lines if line.name == name)


def test_first_pipeline_stage_keeps_pp_micro_batches(tmp_path):
    tokens = 2 * 8192  # one group of 2 responses of max_model_len
    # 8 groups per step on the one DP rank = 8 micro-batches: stage 0 of PP 4 holds 4 of them.
    _, arch, layout, plan = _plan(tmp_path, "parallel.world_size=4", "parallel.pipeline=4")
    train = plan.phases[0]
    assert plan.micro_batch_tokens == tokens and train.name == "training step (stage 0)"
    assert _line(train, "activations") == activations.stored_bytes(
        arch, layout, activations.TE, num_layers=2, tokens=tokens, last_stage=False, in_flight=4)
    # 2 prompts per iteration: 2 micro-batches per step, so at most 2 in flight.
    _, _, layout, plan = _plan(tmp_path, "parallel.world_size=4", "parallel.pipeline=4", "rl.prompts_per_iteration=2")
    assert _line(plan.phases[0], "activations") == activations.stored_bytes(
        arch, layout, activations.TE, num_layers=2, tokens=tokens, last_stage=False, in_flight=2)


def test_full_recompute_keeps_layer_inputs_and_one_layer(tmp_path):
    _, arch, layout, _ = _plan(tmp_path, "parallel.world_size=1", "parallel.recompute=full")
    tokens = 1000
    full = activations.stored_bytes(arch, layout, activations.TE, num_layers=8, tokens=tokens, last_stage=False,
                                    in_flight=3)
    layer_input = activations.layer_input_bytes_per_token(arch, layout)
    one_layer = activations.layer_bytes_per_token(arch, layout, activations.TE)
    assert full == int((3 * 8 * layer_input + one_layer) * tokens)
    assert layer_input == 512 * 2  # the bf16 hidden state


def test_context_parallelism_divides_activations(tmp_path):
    _, _, _, cp1 = _plan(tmp_path, "parallel.world_size=2")
    _, _, _, cp2 = _plan(tmp_path, "parallel.world_size=2", "parallel.context=2")
    assert cp2.local_tokens * 2 == cp1.local_tokens
    assert _line(cp2.phases[0], "activations") == pytest.approx(_line(cp1.phases[0], "activations") / 2, rel=1e-6)


def test_switch_keeps_what_the_engine_does_not_free(tmp_path):
    _, _, _, plan = _plan(tmp_path, "parallel.world_size=1")
    names = [line.name for line in plan.phases[1].lines]
    assert "gradient buffers" not in names and "optimizer: moments" not in names  # freed / dropped
    _, _, _, kept = _plan(tmp_path, "parallel.world_size=1", "engine.offload_grad_buffers=false",
                          "rl.reset_optimizer=false", "engine.offload_optimizer_states=false")
    names = [line.name for line in kept.phases[1].lines]
    assert "gradient buffers" in names and "optimizer: moments" in names
    assert kept.phases[1].total > plan.phases[1].total


def test_rl_micro_batch_follows_the_token_budget(tmp_path):
    group = 2 * 8192  # rl.group_size x rollout.max_model_len
    one = ("parallel.world_size=1", "rl.groups_per_micro_batch=4")
    _, _, _, plan = _plan(tmp_path, *one)
    assert plan.micro_batch_tokens == 4 * group  # no budget: the group cap alone
    _, _, _, plan = _plan(tmp_path, *one, f"data.micro_batch_tokens={2 * group}")
    assert plan.micro_batch_tokens == 2 * group
    _, _, _, plan = _plan(tmp_path, *one, "data.micro_batch_tokens=100")
    assert plan.micro_batch_tokens == group  # one whole group always runs


MOE = dict(SMALL, model_type="qwen3_moe", head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
           norm_topk_prob=True, mlp_only_layers=[0, 1])
"""SMALL as a Qwen3-MoE: 16 experts (top 4) on layers 2-7, layers 0 and 1 dense."""


def test_moe_layers_and_expert_parallelism(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MOE))
    base = [f"model.hf_path={tmp_path}", "rollout.max_model_len=8192", "rl.group_size=2", "rl.prompts_per_iteration=8",
            "parallel.world_size=8"]
    cfg = load_config(None, base + ["parallel.expert=8"], environ={})
    arch = resolve_model_arch(cfg.model)
    layout = layout_from_config(cfg, world_size=8)
    plan = plan_memory(cfg, arch, layout, capacity=80 * 1024 ** 3)
    tokens = 2 * 8192
    # Each kind of layer counted where it is: 2 dense, 6 MoE layers.
    assert _line(plan.phases[0], "activations") == activations.stored_bytes(
        arch, layout, activations.TE, num_layers=8, tokens=tokens, last_stage=True, num_moe_layers=6)
    dense = activations.layer_bytes_per_token(arch, layout, activations.TE)
    moe = activations.layer_bytes_per_token(arch, layout, activations.TE, sparse=True)
    assert moe > dense
    assert activations.stored_bytes(arch, layout, activations.TE, num_layers=8, tokens=tokens, last_stage=False,
                                    num_moe_layers=6) == int((2 * dense + 6 * moe) * tokens)
    # Full recompute keeps the layer inputs plus the largest layer, the MoE one.
    full = layout.replace(recompute="full")
    assert activations.stored_bytes(arch, full, activations.TE, num_layers=8, tokens=tokens, last_stage=False,
                                    num_moe_layers=6) == int(
        (8 * activations.layer_input_bytes_per_token(arch, full) + activations.layer_bytes_per_token(
            arch, full, activations.TE, sparse=True)) * tokens)
    # EP 8 holds 1/8 of the experts' weights and gradients; with the distributed optimizer their
    # moments are sharded over expert DP = 8 / EP ranks, so the same bytes either way.
    ep1 = plan_memory(cfg, arch, layout.replace(expert=1), capacity=80 * 1024 ** 3)
    experts = 6 * 16 * 3 * 512 * 256
    assert _line(ep1.phases[0], "weights") - _line(plan.phases[0], "weights") == 2 * experts * 7 // 8
    sharded = layout.replace(distributed_optimizer=True)
    moments = [_line(plan_memory(cfg, arch, sharded.replace(expert=ep), capacity=80 * 1024 ** 3).phases[0],
                     "optimizer: moments") for ep in (1, 8)]
    assert moments[0] == moments[1]
    notes = [line.note for line in plan_memory(cfg, arch, sharded, capacity=80 * 1024 ** 3).phases[0].lines]
    assert "sharded over DP x CP, experts over DP x CP / EP = 1" in notes
