"""Every validation rule: a bad config is refused with a message naming the key; the nearest
good config passes (so no rule is vacuous)."""

from __future__ import annotations

import pytest

from k15_megatron.config import (ConfigError, have_transformer_engine, load_config,
                                 resolve_world_size, world_size_from_env)

# 8 layers, 8 heads, 4 query groups: divisible by TP 1/2/4 and PP 1/2/4/8.
MODEL = {
    "family": "qwen2", "num_layers": 8, "hidden_size": 128, "ffn_hidden_size": 256,
    "num_attention_heads": 8, "num_query_groups": 4, "vocab_size": 1000,
    "max_position_embeddings": 4096, "norm_epsilon": 1e-6,
}
BASE = [f"model.{k}={v}" for k, v in MODEL.items()] + ["data.seq_length=1024"]


def check(*overrides: str, te: bool = False, environ=None):
    """Load BASE + overrides with an explicit TE probe and environment."""
    return load_config(None, BASE + list(overrides), te_available=lambda: te,
                       environ={} if environ is None else environ)


def refused(*overrides: str, te: bool = False, environ=None) -> str:
    with pytest.raises(ConfigError) as info:
        check(*overrides, te=te, environ=environ)
    return str(info.value)


@pytest.mark.parametrize("key,value", [
    ("precision.dtype", "bf17"), ("precision.fp8", "e5m2"), ("precision.fp8_recipe", "fast"),
    ("precision.fp8_amax_compute_algo", "mean"), ("parallel.backend", "mpi"),
    ("optim.optimizer", "lion"), ("optim.lr_decay_style", "step"),
    ("checkpoint.resume", "always"), ("model.family", "gpt2"),
])
def test_invalid_choices_are_refused(key, value):
    msg = refused(f"{key}={value}")
    assert f"{key}='{value}' is not a valid choice" in msg


@pytest.mark.parametrize("key,value", [
    ("parallel.tensor", 0), ("parallel.context", -1), ("data.micro_batch_size", 0),
    ("optim.lr", -1.0), ("optim.train_iters", 0), ("checkpoint.save_interval", -5),
])
def test_minimums(key, value):
    assert f"{key}={value} must be >=" in refused(f"{key}={value}")


def test_world_size_not_divisible_by_model_parallel():
    msg = refused("parallel.tensor=4", "parallel.pipeline=2", "parallel.world_size=12")
    assert "parallel.tensor=4 x parallel.pipeline=2 x parallel.context=1 = 8" in msg
    assert "world size 12 (parallel.world_size)" in msg
    check("parallel.tensor=4", "parallel.pipeline=2", "parallel.world_size=16")


def test_world_size_from_environment():
    msg = refused("parallel.tensor=4", environ={"WORLD_SIZE": "6"})
    assert "world size 6 (env WORLD_SIZE)" in msg
    msg = refused("parallel.tensor=4", environ={"SLURM_NTASKS": "2"})
    assert "world size 2 (env SLURM_NTASKS)" in msg
    check("parallel.tensor=4", environ={"WORLD_SIZE": "8", "SLURM_NTASKS": "2"})
    assert world_size_from_env({}) == 1
    assert world_size_from_env({"SLURM_NTASKS": "16"}) == 16
    assert resolve_world_size(3, {"WORLD_SIZE": "8"}) == (3, "parallel.world_size")
    with pytest.raises(ValueError, match="WORLD_SIZE='x'"):
        world_size_from_env({"WORLD_SIZE": "x"})
    assert "WORLD_SIZE=0 must be >= 1" in refused(environ={"WORLD_SIZE": "0"})


MOE = ["model.family=qwen3_moe", "model.num_moe_experts=8", "model.moe_router_topk=2"]


def test_expert_parallel_must_divide_dp_times_cp_and_the_experts():
    # world 8, TP 2 -> DP 4, CP 1: EP 3 does not divide 4, EP 4 does.
    msg = refused(*MOE, "parallel.world_size=8", "parallel.tensor=2", "parallel.expert=3",
                  "data.global_batch_size=16")
    assert "parallel.expert=3 must divide data-parallel size x parallel.context = 4 x 1" in msg
    assert "choose a divisor of 4, or run a multiple of 6 processes (parallel.world_size)" in msg  # TP 2 x EP 3
    check(*MOE, "parallel.world_size=8", "parallel.tensor=2", "parallel.expert=4", "data.global_batch_size=16")
    msg = refused("model.family=qwen3_moe", "model.num_moe_experts=6", "model.moe_router_topk=2",
                  "parallel.world_size=4", "parallel.expert=4", "data.global_batch_size=16")
    assert "(1 problem)" in msg and "parallel.expert=4 must divide the 6 experts" in msg and "1, 2, 3, 6" in msg


def test_expert_parallelism_needs_experts_and_allgather_needs_one_stage():
    check("parallel.context=2", "parallel.world_size=2")
    msg = refused("parallel.expert=2", "parallel.world_size=2")
    assert "(1 problem)" in msg and "parallel.expert=2: model family 'qwen2' has no experts" in msg
    check(*MOE, "parallel.expert=2", "parallel.world_size=2", "parallel.moe_token_dispatcher_type=allgather")
    msg = refused(*MOE, "parallel.pipeline=2", "parallel.world_size=2", "parallel.moe_token_dispatcher_type=allgather")
    assert "(1 problem)" in msg and "parallel.moe_token_dispatcher_type=allgather" in msg and "use alltoall" in msg
    check("parallel.world_size=2")


def test_heads_and_query_groups_divisible_by_tensor():
    msg = refused("parallel.tensor=8", "parallel.world_size=8")
    assert "model.num_query_groups=4 is not divisible by parallel.tensor=8" in msg
    assert "model.num_attention_heads" not in msg  # 8 heads divide by 8
    assert "choose parallel.tensor among 1, 2, 4" in msg
    msg = refused("parallel.tensor=4", "parallel.world_size=4", "model.num_attention_heads=6",
                  "model.num_query_groups=6", "model.kv_channels=16")
    assert "model.num_attention_heads=6 is not divisible by parallel.tensor=4" in msg
    assert "model.num_query_groups=6 is not divisible by parallel.tensor=4" in msg


def test_padded_vocab_divisible_by_tensor():
    # vocab 1001 rounded up to a multiple of 4 is 1004, which 8 TP shards cannot split.
    layout = ["parallel.tensor=8", "parallel.world_size=8", "model.num_query_groups=8",
              "model.vocab_size=1001"]
    msg = refused(*layout, "model.make_vocab_size_divisible_by=4")
    assert "padded vocabulary 1004" in msg and "model.make_vocab_size_divisible_by=4" in msg
    assert "parallel.tensor=8" in msg
    check(*layout, "model.make_vocab_size_divisible_by=8")  # 1008 = 8 * 126


def test_layers_divisible_by_pipeline():
    msg = refused("parallel.pipeline=3", "parallel.world_size=3")
    assert "model.num_layers=8 is not divisible by parallel.pipeline=3" in msg
    assert "pipeline_first_stage_layers" in msg  # names the way out


@pytest.mark.parametrize("pp,first,last,ok", [
    (3, 3, 3, True),       # 3 + 2 + 3
    (3, 2, None, True),    # 2, then 6 over the other two stages: 3 + 3
    (3, None, 3, False),   # 5 left over the other two stages
    (4, 1, 1, True),       # 1 + 3 + 3 + 1
    (4, 2, 1, False),      # 5 left over 2 middle stages
    (2, 3, 5, True),       # no middle stages, nothing left
    (2, 3, 4, False),      # no middle stages, 1 layer left over
    (3, 4, 4, False),      # middle stage would be empty
    (3, 5, 5, False),      # more layers than the model has
    (1, 4, None, False),   # uneven split without pipeline parallelism
])
def test_uneven_pipeline_split(pp, first, last, ok):
    overrides = [f"parallel.pipeline={pp}", f"parallel.world_size={pp}",
                 f"parallel.pipeline_first_stage_layers={'null' if first is None else first}",
                 f"parallel.pipeline_last_stage_layers={'null' if last is None else last}"]
    if ok:
        check(*overrides)
    else:
        assert "parallel.pipeline_first_stage_layers" in refused(*overrides)


def test_sequence_rules_under_context_and_sequence_parallelism():
    """Packed sequences are padded to the CP/SP multiple one by one: data.seq_length needs no
    particular length; sequence parallelism needs TP > 1."""
    check("parallel.context=4", "parallel.world_size=4", "data.seq_length=1004")
    check("parallel.sequence_parallel=true", "parallel.tensor=4", "parallel.context=2",
          "parallel.world_size=8", "data.seq_length=1002")
    msg = refused("parallel.sequence_parallel=true")
    assert "parallel.sequence_parallel=true needs parallel.tensor > 1" in msg


def test_all_to_all_cp_needs_heads_divisible_by_context():
    # The base model has 8 attention heads.
    msg = refused("parallel.context=3", "parallel.world_size=3", "parallel.cp_comm_type=a2a")
    assert "parallel.cp_comm_type=a2a scatters the 8 attention heads" in msg and "(1 problem)" in msg
    check("parallel.context=3", "parallel.world_size=3")  # p2p: any context size
    check("parallel.context=2", "parallel.world_size=4", "parallel.tensor=2", "parallel.cp_comm_type=a2a")


def test_global_batch_divisible_by_micro_batch_times_dp():
    msg = refused("parallel.world_size=4", "data.micro_batch_size=2", "data.global_batch_size=12")
    assert "data.global_batch_size=12 is not divisible by data.micro_batch_size=2 x " \
           "data-parallel size 4 = 8" in msg
    check("parallel.world_size=4", "data.micro_batch_size=2", "data.global_batch_size=16")


def test_fp8_needs_transformer_engine_real_probe():
    if have_transformer_engine():
        pytest.skip("Transformer Engine is installed here; the refusal path cannot occur")
    with pytest.raises(ConfigError) as info:
        load_config(None, BASE + ["precision.fp8=hybrid"], environ={})
    assert "precision.fp8='hybrid' needs Transformer Engine" in str(info.value)


def test_fp8_with_transformer_engine_checks_gemm_alignment():
    check("precision.fp8=e4m3", te=True)  # 128 / 256 / 8*16: all multiples of 16
    msg = refused("precision.fp8=e4m3", "parallel.tensor=4", "parallel.world_size=4",
                  "model.ffn_hidden_size=200", te=True)
    assert "model.ffn_hidden_size / parallel.tensor = 50 is not a multiple of 16" in msg
    assert "needs Transformer Engine" in refused("precision.fp8=e4m3", te=False)


def test_optimizer_schedule_rules():
    assert "optim.min_lr=0.1 exceeds optim.lr=0.01" in refused("optim.lr=0.01", "optim.min_lr=0.1")
    assert "optim.adam_beta2=1.0 must be < 1" in refused("optim.adam_beta2=1.0")
    msg = refused("optim.lr_decay_style=cosine", "optim.lr_warmup_iters=100",
                  "optim.train_iters=100")
    assert "optim.lr_warmup_iters=100 must be smaller than the decay length 100" in msg
    check("optim.lr_decay_style=cosine", "optim.lr_warmup_iters=100", "optim.lr_decay_iters=200",
          "optim.train_iters=100")


def test_model_architecture_problems_surface_in_validation(tmp_path):
    msg = refused(f"model.hf_path={tmp_path}")
    assert f"model.hf_path='{tmp_path}': no config.json there" in msg
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.seq_length=128"], environ={})
    assert "model.family, model.num_layers" in str(info.value)


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        check("parallel.tensor=3", "parallel.world_size=8", "precision.dtype=half",
              "parallel.sequence_parallel=true", "parallel.cp_comm_type=ring", "optim.adam_beta1=2")
    errors = info.value.errors
    assert len(errors) >= 5
    for key in ("precision.dtype", "parallel.tensor=3", "parallel.cp_comm_type",
                "optim.adam_beta1", "model.num_attention_heads=8"):
        assert any(key in e for e in errors), key
