"""The typed experiment schema: every configurable knob and its one default.

Each section is a plain ``@dataclass`` that OmegaConf can use as a structured config
(fields are int/float/str/bool, ``Optional`` of those, ``List``/``Dict``, or another
section dataclass). Defaults live here and nowhere else: YAML recipes in ``examples/``
hold overrides only.

Extending the schema
    A new top-level section (``rollout``, ``rl``, ``rewards``) is one line in
    :class:`ExperimentConfig`. The loader discovers keys by walking these dataclasses, and
    :func:`k15_megatron.config.validate.validate` checks every field declared with
    :func:`one_of` / :func:`at_least` in any section, so neither needs editing. A section
    with cross-field rules of its own may define ``config_errors(self, prefix: str) ->
    List[str]``; ``validate`` calls it with the section's dotted key (e.g. ``"rl"``).

Enumerations are ``str`` fields with an explicit choice list (not ``Literal``) so that
OmegaConf accepts them and the error message can list the alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from k15_megatron.config.fields import at_least, one_of
from k15_megatron.config.dpo import DPOConfig
from k15_megatron.config.curate import CurateConfig
from k15_megatron.config.engine import EngineConfig
from k15_megatron.config.evaluation import EvalConfig
from k15_megatron.config.rewards import RewardsConfig
from k15_megatron.config.rl import RLConfig
from k15_megatron.config.rollout import RolloutConfig
from k15_megatron.config.sample import SampleConfig

TOO_LONG_CHOICES = ("filter", "error")
FIELD_KEYS = ("prompt", "response", "answer", "messages", "images", "difficulty", "reward", "data_source", "tests",
              "chosen", "rejected", "responses", "correct")
"""Record keys ``data.fields`` may map to columns of other names."""
"""Values of ``data.too_long``."""

RECOMPUTE_CHOICES = ("none", "selective", "full")
"""Values of ``parallel.recompute``."""

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "qwen2_vl",
                      "qwen2_5_vl")
"""Model families the Megatron builders implement (HF ``model_type`` values)."""


@dataclass
class ModelConfig:
    """Which network to train. The architecture comes from ``<hf_path>/config.json``;
    every architecture field below left at ``None`` is taken from there (see
    :func:`k15_megatron.config.model_arch.resolve_model_arch`)."""

    hf_path: Optional[str] = None
    """Hugging Face folder whose config.json defines the architecture; its weights are used
    when converting. ``None``: the architecture is given entirely by the fields below."""
    family: Optional[str] = one_of(None, SUPPORTED_FAMILIES)
    """Model family (llama | qwen2 | qwen3 | mistral | qwen2_moe | qwen3_moe | deepseek_v3 | qwen2_vl |
    qwen2_5_vl; the vision-language families only from a model.hf_path). ``None``: from config.json
    ``model_type``."""
    num_layers: Optional[int] = at_least(None, 1)
    """Number of transformer layers (HF ``num_hidden_layers``)."""
    hidden_size: Optional[int] = at_least(None, 1)
    """Model width (HF ``hidden_size``)."""
    ffn_hidden_size: Optional[int] = at_least(None, 1)
    """SwiGLU inner width (HF ``intermediate_size``)."""
    num_attention_heads: Optional[int] = at_least(None, 1)
    """Number of query heads (HF ``num_attention_heads``)."""
    num_query_groups: Optional[int] = at_least(None, 1)
    """Number of key/value heads for grouped-query attention (HF ``num_key_value_heads``)."""
    kv_channels: Optional[int] = at_least(None, 1)
    """Per-head dimension (HF ``head_dim``; default hidden_size / num_attention_heads)."""
    vocab_size: Optional[int] = at_least(None, 1)
    """Tokenizer vocabulary size before padding (HF ``vocab_size``)."""
    max_position_embeddings: Optional[int] = at_least(None, 1)
    """Longest position the model was trained for (HF ``max_position_embeddings``)."""
    rope_theta: Optional[float] = at_least(None, 0.0)
    """RoPE base frequency (HF ``rope_theta`` or ``rope_parameters.rope_theta``)."""
    rope_scaling: Optional[Dict[str, Any]] = None
    """RoPE scaling (HF ``rope_scaling`` / ``rope_parameters``): ``rope_type: llama3`` (with
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) or ``yarn``
    (factor, original_max_position_embeddings; optional beta_fast, beta_slow,
    attention_factor, mscale, mscale_all_dim, truncate), as transformers reads them;
    ``{rope_type: default}`` switches config.json's scaling off. Other types are refused."""
    norm_epsilon: Optional[float] = at_least(None, 0.0)
    """RMSNorm epsilon (HF ``rms_norm_eps``)."""
    tie_word_embeddings: Optional[bool] = None
    """Share the input embedding with the output layer (HF ``tie_word_embeddings``)."""
    add_qkv_bias: Optional[bool] = None
    """Bias on the Q/K/V projections only (Qwen2: true)."""
    qk_layernorm: Optional[bool] = None
    """RMSNorm on per-head queries and keys (Qwen3: true)."""
    num_moe_experts: Optional[int] = at_least(None, 1)
    """Routed experts per MoE layer (HF ``num_experts``); ``None`` on a dense model."""
    moe_router_topk: Optional[int] = at_least(None, 1)
    """Experts each token is routed to (HF ``num_experts_per_tok``)."""
    moe_ffn_hidden_size: Optional[int] = at_least(None, 1)
    """SwiGLU inner width of each routed expert (HF ``moe_intermediate_size``)."""
    moe_shared_expert_intermediate_size: Optional[int] = at_least(None, 1)
    """Inner width of the gated shared expert (qwen2_moe, HF ``shared_expert_intermediate_size``)."""
    moe_aux_loss_coeff: Optional[float] = at_least(None, 0.0)
    """Weight of Megatron's per-layer load-balancing loss (switch-style) added to the training
    loss (HF ``router_aux_loss_coef``; 0 switches it off)."""
    moe_z_loss_coeff: Optional[float] = at_least(None, 0.0)
    """Weight of the router z-loss (mean squared logsumexp of the router logits); ``None``: off."""
    make_vocab_size_divisible_by: int = at_least(128, 1)
    """The embedding is padded to a multiple of this (independent of the tensor-parallel
    size, so one checkpoint loads under any TP dividing it); TP must divide the padded size."""
    init_from: Optional[str] = None
    """Megatron checkpoint whose weights start the run (optimizer state is not loaded)."""


@dataclass
class ParallelConfig:
    """How the model and data are split across processes (Megatron-Core semantics)."""

    tensor: int = at_least(1, 1)
    """Tensor-parallel size (TP)."""
    pipeline: int = at_least(1, 1)
    """Pipeline-parallel size (PP)."""
    context: int = at_least(1, 1)
    """Context-parallel size (CP): every sequence is cut into 2*CP chunks and CP rank r holds
    chunks r and 2*CP-1-r (Megatron's load-balanced layout); attention is exact over the CP
    group (:mod:`k15_megatron.models.attention` without Transformer Engine, TE's CP attention
    with it)."""
    cp_comm_type: str = one_of("p2p", ("p2p", "a2a", "allgather", "a2a+p2p"))
    """Transformer Engine's context-parallel attention communication (TransformerConfig
    ``cp_comm_type``; "allgather" is TE's "all_gather"): p2p (ring of K/V exchanges, overlapped
    with compute) | a2a (all-to-all over heads, Ulysses-style; needs heads divisible by CP) |
    allgather | a2a+p2p (hierarchical). Used only with the TE layer spec (GPUs, written for them
    and not run here); without TE the portable attention always all-gathers K/V."""
    expert: int = at_least(1, 1)
    """Expert-parallel size (EP) for mixture-of-experts models: each MoE layer's experts are
    split over EP ranks carved from data parallelism x context (Megatron's expert layout; the
    experts keep the tensor-parallel size). Must divide the experts; refused for dense models."""
    moe_token_dispatcher_type: str = one_of("alltoall", ("alltoall", "allgather"))
    """Megatron's MoE token dispatcher (TransformerConfig ``moe_token_dispatcher_type``):
    alltoall (tokens sent to the EP ranks holding their experts) | allgather (every rank
    gathers all tokens; refused with parallel.pipeline > 1)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor > 1; an error otherwise, never silently
    switched off)."""
    pipeline_first_stage_layers: Optional[int] = at_least(None, 1)
    """Layers on the first pipeline stage for an uneven split (``None``: even split)."""
    pipeline_last_stage_layers: Optional[int] = at_least(None, 1)
    """Layers on the last pipeline stage for an uneven split (``None``: even split)."""
    world_size: Optional[int] = at_least(None, 1)
    """Total number of processes. ``None``: env WORLD_SIZE, else SLURM_NTASKS, else 1."""
    backend: str = one_of("auto", ("auto", "nccl", "gloo"))
    """torch.distributed backend: auto (nccl with CUDA, gloo without) | nccl | gloo."""
    recompute: str = one_of("none", RECOMPUTE_CHOICES)
    """Activation recomputation, what each rank keeps for the backward pass (Megatron-Core
    TransformerConfig.recompute_granularity): none (every activation kept) | selective (core
    attention recomputed: recompute_modules=["core_attn"]) | full (only each layer's input
    kept, the layer recomputed in backward: recompute_method="uniform",
    recompute_num_layers=1). Full trades about one more forward pass for activation memory
    that no longer grows with the layer's width (``k15 plan`` prints both)."""


@dataclass
class PrecisionConfig:
    """Numeric formats for parameters, activations and gradients.

    The ``fp8*`` keys become Megatron-Core TransformerConfig fields as Megatron-LM's
    ``--fp8-*`` flags set them (:func:`k15_megatron.models.gpt.fp8_config_fields`); FP8 needs
    Transformer Engine and a GPU that has it (:mod:`k15_megatron.config.fp8`)."""

    dtype: str = one_of("bf16", ("bf16", "fp16", "fp32"))
    """Parameter/activation dtype: bf16 | fp16 | fp32."""
    fp8: Optional[str] = one_of(None, ("e4m3", "hybrid"))
    """FP8 GEMMs through Transformer Engine (TransformerConfig.fp8, Megatron-LM
    ``--fp8-format``): null (off) | e4m3 | hybrid (e4m3 forward, e5m2 gradients)."""
    fp8_recipe: str = one_of("delayed", ("delayed", "tensorwise", "blockwise", "mxfp8"))
    """FP8 scaling recipe (``--fp8-recipe``): delayed (amax history) | tensorwise (current
    scaling, TE >= 2.2) | blockwise (TE >= 2.3, compute capability >= 9.0) | mxfp8 (TE >= 2.1,
    Blackwell, compute capability >= 10.0)."""
    fp8_margin: int = at_least(0, 0)
    """Scaling-factor margin: scale = max_fp8 / amax / 2**margin (``--fp8-margin``)."""
    fp8_amax_history_len: int = at_least(1024, 1)
    """Amax history window of the delayed recipe (``--fp8-amax-history-len``; 1024 is TE's
    DelayedScaling default, Megatron-LM's flag defaults to 1)."""
    fp8_amax_compute_algo: str = one_of("max", ("max", "most_recent"))
    """How the delayed recipe picks amax from its history: max | most_recent
    (``--fp8-amax-compute-algo``; max is TE's default, Megatron-LM's flag defaults to most_recent)."""
    fp8_wgrad: bool = True
    """Weight-gradient GEMMs in FP8 too; false computes them in ``dtype`` (``--no-fp8-wgrad``)."""
    fp8_param_gather: bool = False
    """Keep GEMM weights in FP8 and all-gather them as FP8 (TransformerConfig.fp8_param and
    DDP ``fp8_param_gather``, Megatron-LM ``--fp8-param-gather``); needs precision.fp8 and
    optim.use_distributed_optimizer."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and all-reduce gradients in fp32."""

    def config_errors(self, prefix: str) -> List[str]:
        """Rules within this section (the platform rules are in :mod:`k15_megatron.config.fp8`)."""
        if self.fp8_param_gather and self.fp8 is None:
            return [f"{prefix}.fp8_param_gather=true needs {prefix}.fp8 (e4m3 or hybrid); set one "
                    f"or set {prefix}.fp8_param_gather=false"]
        return []


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (iterations are optimizer steps)."""

    optimizer: str = one_of("adam", ("adam", "sgd"))
    """adam (AdamW-style decoupled weight decay, as Megatron) | sgd."""
    lr: float = at_least(1e-6, 0.0)
    """Peak learning rate."""
    min_lr: float = at_least(0.0, 0.0)
    """Learning rate at the end of decay."""
    weight_decay: float = at_least(0.0, 0.0)
    """Decoupled weight decay coefficient."""
    adam_beta1: float = at_least(0.9, 0.0)
    """Adam first-moment decay."""
    adam_beta2: float = at_least(0.95, 0.0)
    """Adam second-moment decay."""
    adam_eps: float = at_least(1e-8, 0.0)
    """Adam denominator epsilon."""
    clip_grad: float = at_least(1.0, 0.0)
    """Global gradient-norm clip (0 disables clipping)."""
    lr_warmup_iters: int = at_least(0, 0)
    """Linear warm-up length in iterations."""
    lr_decay_style: str = one_of("constant", ("constant", "linear", "cosine"))
    """constant | linear | cosine decay after warm-up."""
    lr_decay_iters: Optional[int] = at_least(None, 1)
    """Optimizer steps over which the rate decays to min_lr (``None``: the job's step count,
    optim.train_iters for SFT, rl.iterations x rl.updates_per_iteration for RL)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (Megatron distributed optimizer)."""
    train_iters: int = at_least(100, 1)
    """Optimizer steps of ``k15 sft`` (and its schedule length when lr_decay_iters is null).
    ``k15 rl`` makes rl.iterations x rl.updates_per_iteration steps and schedules over those."""


@dataclass
class DataConfig:
    """Sequence shapes and where training/evaluation data live."""

    seq_length: Optional[int] = at_least(None, 1)
    """SFT: tokens per packed row; null takes the model's context (max_position_embeddings),
    filled in when the config is validated. ``k15 sft`` refuses a value above the model's
    context. (RL lengths are rollout.max_model_len.)"""
    micro_batch_size: int = at_least(1, 1)
    """SFT: rows per forward/backward on one data-parallel rank. (RL micro-batches hold at
    most rl.groups_per_micro_batch groups.)"""
    micro_batch_tokens: Optional[int] = at_least(None, 1)
    """Token budget of one packed micro-batch in ``k15 rl``'s reference log-prob recompute
    (``k15_megatron.train.logprobs.sequence_token_logprobs`` from the policy update: each
    sample's real tokens, right padding cut off, each padded only to the 2 x parallel.context
    (x parallel.tensor under sequence parallelism) multiple; consecutive samples fill a
    micro-batch until the next would pass the budget or rl.groups_per_micro_batch x
    rl.group_size samples, a longer one runs alone). The policy update uses the same budget
    for its training micro-batches (``k15_megatron.train.policy_update.packed_micro_batches``:
    whole groups, at most rl.groups_per_micro_batch of them; a group above the budget runs
    alone). null = no token budget, the caps alone. Not used by the log-prob check after a
    weight sync (engine.*) or by ``k15 sft``."""
    global_batch_size: int = at_least(8, 1)
    """SFT: rows per optimizer step over all data-parallel ranks. (An RL step trains on the
    finished groups of an iteration / rl.updates_per_iteration: rl.prompts_per_iteration /
    rl.updates_per_iteration groups when every group finishes within the iteration.)"""
    train_path: Optional[str] = None
    """Training JSONL file: SFT records for ``k15 sft``, prompt records for ``k15 rl``
    (formats in :mod:`k15_megatron.data.jsonl`)."""
    eval_path: Optional[str] = None
    """Held-out prompt JSONL file for ``k15 eval`` and the RL job's evaluations."""
    too_long: str = one_of("filter", TOO_LONG_CHOICES)
    """What happens to an SFT example longer than ``seq_length`` tokens, or an RL/eval prompt
    longer than rollout.max_model_len - rollout.max_response_tokens tokens (chat template
    included): filter = dropped at load, with one line counting them (and their first line
    numbers) | error = the job is refused before it starts, naming each such file:line."""
    fields: Dict[str, str] = field(default_factory=dict)
    """Record key -> the column of the data files that holds it, for files whose columns are
    named otherwise (``data.fields.prompt=question``, ``data.fields.answer=solution``); applies to
    every data file the job reads (JSONL, Parquet, datasets folders). Keys: prompt, response,
    answer, messages, images, difficulty, reward, data_source, tests, chosen, rejected, responses,
    correct."""
    chat_template: Optional[str] = None
    """How prompts become a chat turn (:mod:`k15_megatron.data.formatting`): null = the
    tokenizer's own template, or the built-in default (``User: <prompt>\n\nAssistant: ``) with a
    one-line warning when it has none | default = the built-in default | raw = the prompt text
    alone, no separator | a path to a Jinja chat-template file."""

    def config_errors(self, prefix: str) -> List[str]:
        errors = [f"{prefix}.fields.{key}: not a record key; use one of {list(FIELD_KEYS)}"
                  for key in self.fields if key not in FIELD_KEYS]
        columns = list(self.fields.values())
        errors += [f"{prefix}.fields: column {c!r} is mapped to several keys" for c in sorted(set(columns))
                   if columns.count(c) > 1]
        return errors


@dataclass
class CheckpointConfig:
    """Where and how often Megatron checkpoints are written and read."""

    save_dir: str = "${run_dir}/checkpoints"
    """Folder receiving checkpoints."""
    save_interval: int = at_least(0, 0)
    """Save every this many iterations (0: only at the end)."""
    resume: str = one_of("auto", ("auto", "never"))
    """auto: resume from the newest checkpoint in save_dir if any (with a config that differs
    from the checkpoint's only as allow_config_change describes; a run whose checkpoint reached
    its length says so and exits 0) | never: a fresh start, refused before start-up when save_dir
    already holds checkpoints (it would write over them)."""
    keep_last: int = at_least(3, 0)
    """Keep this many newest checkpoints (0 keeps all)."""
    allow_config_change: bool = False
    """Resume (resume=auto) even when the config differs from the resume checkpoint's in keys
    that change what is trained (anything but the run length, logging.*, eval.*, the
    checkpoint cadence and the RL evaluation keys, which may always change); without it such a
    start is refused before any process starts, naming each changed key. Either way the
    difference is printed and recorded in ``run_dir/starts.jsonl``
    (:mod:`k15_megatron.checkpoint.run_dir`). Changes to the optimizer's settings (optim.* but
    clip_grad and the run length) are refused even with this key: a resume restores the
    optimizer's settings and learning-rate schedule from the
    checkpoint (a longer run with a decaying rate needs optim.lr_decay_iters set to the
    checkpoint's decay length); train the weights with other settings in a new run with
    model.init_from."""


@dataclass
class LoggingConfig:
    """Metric logging."""

    log_interval: int = at_least(1, 1)
    """Log metrics every this many iterations."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    jsonl: bool = True
    """Append one JSON line of metrics per logged iteration."""
    dir: str = "${run_dir}"
    """Folder for logs."""


@dataclass
class ExperimentConfig:
    """The root of an experiment configuration. Functions take the section they need."""

    name: str = "k15"
    """Experiment name (used in run_dir by default)."""
    run_dir: str = "runs/${name}"
    """Folder for everything a run writes: config.yaml (the config of the newest checkpoint),
    starts.jsonl and starts/ (a record of every start of ``k15 sft`` / ``k15 rl``: command,
    resumed checkpoint, config changes, the config itself), metrics, checkpoints."""
    seed: int = 1234
    """Global random seed."""
    deterministic: bool = False
    """Per-request random streams: every rollout request samples from its own stream seeded by
    (seed, trajectory, position), so its samples do not depend on which requests share a vLLM
    batch; torch uses deterministic algorithms. Either way a resumed `k15 rl` run continues
    exactly where it stopped on CPU (the checkpoint carries the engine's own sampler stream,
    which requests without a seed draw from); on GPU neither mode has been run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture and initial weights."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numeric formats."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data shapes and paths."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    rl: RLConfig = field(default_factory=RLConfig)
    """The RL algorithm: mirror-descent loss, length penalty, sampling, replay, repeat detection."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The vLLM rollout engine colocated in the training processes, and how it samples."""
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    """Verifiable rewards (math, code, CoT reward model) and how prompts pick them."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The hybrid engine: switching between training and rollout, weight sync, log-prob check."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Direct preference optimisation (k15 dpo): beta, the pair-building ratio."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation (k15 eval and the RL job's before/after evaluation)."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Shortest rejection sampling (k15 sample)."""
    curate: CurateConfig = field(default_factory=CurateConfig)
    """Prompt-set curation (k15 curate): format rules, the easy-to-hack filter, difficulty labels."""
