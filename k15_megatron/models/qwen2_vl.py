"""Qwen2-VL and Qwen2.5-VL as Megatron-Core modules: a vision transformer and patch merger
feeding a GPTModel with M-RoPE (:mod:`k15_megatron.config.vision_arch` describes the architecture).

* Vision tower (:class:`Qwen2VisionModel`): the patch embedding is a linear map over flattened
  patches (Qwen2-VL's Conv3d has stride = kernel, so it is exactly that), then Megatron-Core's
  ``TransformerBlock`` built from the local layer spec with LayerNorm, biases, a ``quick_gelu``
  MLP and a bidirectional core attention (:class:`PackedImageAttention`) that attends within
  each image only: the image boundaries travel as ``cu_seqlens`` in ``PackedSeqParams`` (with
  ``qkv_format="sbhd"`` so Megatron applies the per-patch 2-D rotary angles as given, rather
  than restarting positions per segment as it does for THD). The merger is a LayerNorm over
  each patch followed by Megatron's ``MultimodalProjector`` MLP (GELU) on every
  ``spatial_merge_size^2`` consecutive patches.
* Qwen2.5-VL: RMSNorm and a SwiGLU MLP (with biases) in the blocks, RMSNorm before the merger,
  and window attention: the merged units are reordered window by window
  (:func:`window_order`), the blocks not in ``fullatt_block_indexes`` attend within their
  window (:class:`ImageSegments` carries both segmentations), and the merged tokens are put
  back in the processor's order at the end.
* Tensor parallelism: the vision blocks and the merger MLP are sharded over the same
  tensor-parallel group as the language model (column/row-parallel linears; vision heads must
  divide by TP); the patch embedding and the LayerNorms are replicated. Every TP rank gets the
  same pixels, so replicated parameters receive the same gradients.
* Pipeline parallelism: the vision tower and the embedding replacement live on the first
  pipeline stage only; later stages receive hidden states as a plain GPTModel does.
* Language model: Megatron-Core's ``GPTModel`` with ``position_embedding_type="mrope"`` and the
  config's ``mrope_section``; position ids are [3, B, S] (:func:`mrope_position_ids`). The
  embeddings of ``<|image_pad|>`` tokens are replaced by the merged image embeddings, in order.

Packed (THD) micro-batches run too: each sequence keeps its own M-RoPE positions and images.

Not covered: videos; sequence and context parallelism (refused by :func:`build_qwen2_vl_model`);
Transformer Engine's layer spec for the vision blocks (the local spec is used on every machine).
Verified on the CPU (gloo) only: this code has not run on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from k15_megatron.parallel.device import HAVE_CUDA


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), the vision MLP's activation (transformers' ``quick_gelu``)."""
    return x * torch.sigmoid(1.702 * x)


@dataclass
class ImageSegments(PackedSeqParams):
    """PackedSeqParams (``qkv_format="sbhd"``) of a packed patch sequence: ``cu_seqlens_q`` /
    ``cu_seqlens_kv`` [images + 1] are the images' patch offsets, ``window_cu_seqlens``
    [windows + 1] the attention windows' (Qwen2.5-VL; None for Qwen2-VL)."""

    window_cu_seqlens: Optional[torch.Tensor] = None


class PackedImageAttention(torch.nn.Module):
    """Bidirectional core attention within each image (or window) of a packed patch sequence.

    Built by Megatron's SelfAttention with DotProductAttention's arguments. ``forward(query, key,
    value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None)``
    takes query/key/value [S, 1, heads/TP, dim] (all images' patches in one sequence) and
    ``packed_seq_params.cu_seqlens_q`` [images + 1] (patch offsets of the images); each patch
    attends to every patch of its own image (SDPA, no mask). With ``full_attention_layers``
    (0-based block indices; Qwen2.5-VL) the other blocks attend within the windows of
    ``packed_seq_params.window_cu_seqlens`` instead. Returns [S, 1, heads/TP * dim].
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, full_attention_layers=None):
        super().__init__()
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.windowed = full_attention_layers is not None and layer_number - 1 not in full_attention_layers

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or query.shape[1] != 1:
            raise ValueError("PackedImageAttention needs one packed sequence [S, 1, ...] and its cu_seqlens")
        q, k, v = (x.squeeze(1).transpose(0, 1) for x in (query, key, value))  # [heads, S, dim]
        segments = packed_seq_params.window_cu_seqlens if self.windowed else packed_seq_params.cu_seqlens_q
        bounds = segments.tolist()
        outputs = [F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], scale=self.scale)
                   for a, b in zip(bounds[:-1], bounds[1:])]
        out = torch.cat(outputs, dim=1).transpose(0, 1)  # [S, heads, dim]
        return out.reshape(out.shape[0], 1, -1)


def vision_transformer_config(vision, *, language_config):
    """The TransformerConfig of the vision blocks: ``vision`` (a VisionArch) sizes, the
    language model's tensor parallelism and dtype, one pipeline stage."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    lm = language_config
    return TransformerConfig(
        num_layers=vision.depth, hidden_size=vision.embed_dim, ffn_hidden_size=vision.ffn_hidden_size,
        num_attention_heads=vision.num_heads, num_query_groups=vision.num_heads,
        kv_channels=vision.embed_dim // vision.num_heads, layernorm_epsilon=1e-6,
        normalization="RMSNorm" if vision.is_qwen2_5 else "LayerNorm", gated_linear_unit=vision.is_qwen2_5,
        activation_func=F.silu if vision.is_qwen2_5 else quick_gelu, add_bias_linear=True, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=lm.use_cpu_initialization, params_dtype=lm.params_dtype,
        pipeline_dtype=lm.pipeline_dtype, bf16=lm.bf16, fp16=lm.fp16,
        tensor_model_parallel_size=lm.tensor_model_parallel_size, pipeline_model_parallel_size=1)


def merger_transformer_config(vision, *, vision_config):
    """The TransformerConfig of the merger MLP: merged patches (``merged_width``) -> GELU ->
    the language model's width."""
    return dataclasses.replace(vision_config, num_layers=1, hidden_size=vision.out_hidden_size,
                               ffn_hidden_size=vision.merged_width, activation_func=F.gelu, gated_linear_unit=False)


def vision_layer_spec(vision):
    """Megatron's local layer spec with the family's norm and :class:`PackedImageAttention` (no
    mask; windowed outside ``fullatt_block_indexes`` for Qwen2.5-VL)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm" if vision.is_qwen2_5 else "LayerNorm")
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}
    full = vision.fullatt_block_indexes if vision.is_qwen2_5 else None
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=PackedImageAttention, params={"full_attention_layers": full})
    return spec


def window_order(grid_thw: torch.Tensor, *, window_size: int, patch_size: int,
                 spatial_merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window regrouping of merged units: (order [U], window_cu_seqlens [W + 1]).

    ``order[j]`` is the merged unit (index in the processor's order over all images) placed
    at position j; each image's units are tiled into windows of ``window_size / patch_size /
    spatial_merge_size`` units per side (the last row/column of windows may be smaller), taken
    window by window, row-major inside. ``window_cu_seqlens`` are the windows' patch offsets.
    Source: transformers' ``get_vision_window_index``.
    """
    side = window_size // spatial_merge_size // patch_size
    unit = spatial_merge_size ** 2
    order, bounds, first = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        index = torch.arange(t * gh * gw).reshape(t, gh, gw) + first
        for frame in index:
            for r in range(0, gh, side):
                for c in range(0, gw, side):
                    window = frame[r:r + side, c:c + side].flatten()
                    order.append(window)
                    bounds.append(bounds[-1] + window.numel() * unit)
        first += t * gh * gw
    return torch.cat(order), torch.tensor(bounds, dtype=torch.int32)


def vision_rotary_angles(grid_thw: torch.Tensor, *, head_dim: int, spatial_merge_size: int,
                         theta: float) -> torch.Tensor:
    """Per-patch rotary angles [P, 1, 1, head_dim] of Qwen2-VL's 2-D RoPE for images with
    ``grid_thw`` [I, 3] (frames, patch rows, patch columns), patches in the processor's order
    (``spatial_merge_size`` x ``spatial_merge_size`` blocks, row-major inside and between them).

    The first half of the channels rotates by the patch row, the second by its column, each
    with frequencies theta^(-2j / (head_dim/2)); laid out [row, column, row, column] as Megatron's
    non-interleaved RoPE expects. Source: transformers' ``Qwen2VLVisionRotaryEmbedding``.
    """
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float32) / (head_dim // 2)))
    rows, cols = [], []
    m = spatial_merge_size
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).unsqueeze(1).expand(h, w).reshape(h // m, m, w // m, m).transpose(1, 2)
        wpos = torch.arange(w).unsqueeze(0).expand(h, w).reshape(h // m, m, w // m, m).transpose(1, 2)
        rows.append(hpos.flatten().repeat(t))
        cols.append(wpos.flatten().repeat(t))
    angle_h = torch.cat(rows).float().unsqueeze(1) * inv_freq
    angle_w = torch.cat(cols).float().unsqueeze(1) * inv_freq
    return torch.cat([angle_h, angle_w, angle_h, angle_w], dim=-1)[:, None, None, :]


class Qwen2VisionModel(MegatronModule):
    """Qwen2-VL's vision tower and patch merger (see the module docstring for the sharding).

    ``forward(pixel_values [P, in_channels * temporal_patch_size * patch_size^2], grid_thw [I, 3])``
    returns the merged image embeddings [P / spatial_merge_size^2, out_hidden_size], images in
    order. Parameters: ``patch_embed.weight``, ``decoder.*`` (Megatron TransformerBlock),
    ``merger_norm.{weight,bias}``, ``merger.encoder.linear_fc{1,2}.{weight,bias}``.
    """

    def __init__(self, vision, *, language_config):
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.transformer.transformer_block import TransformerBlock

        super().__init__(config=vision_transformer_config(vision, language_config=language_config))
        self.arch = vision
        dtype = self.config.params_dtype
        self.patch_embed = torch.nn.Linear(vision.patch_input_size, vision.embed_dim, bias=False, dtype=dtype)
        self.decoder = TransformerBlock(config=self.config, spec=vision_layer_spec(vision), post_layer_norm=False,
                                        pre_process=True, post_process=True)
        norm = torch.nn.RMSNorm if vision.is_qwen2_5 else torch.nn.LayerNorm
        self.merger_norm = norm(vision.embed_dim, eps=1e-6, dtype=dtype)
        mlp = gpt_layer_specs.get_mlp_module_spec(use_te=False).submodules
        self.merger = MultimodalProjector(merger_transformer_config(vision, vision_config=self.config), mlp,
                                          "mlp", vision.merged_width)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        counts = grid_thw.prod(dim=1)
        if int(counts.sum()) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, image_grid_thw "
                             f"{grid_thw.tolist()} describes {int(counts.sum())}")
        cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        segments = ImageSegments(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                 max_seqlen_q=int(counts.max()), max_seqlen_kv=int(counts.max()))
        angles = vision_rotary_angles(grid_thw, head_dim=self.config.kv_channels,
                                      spatial_merge_size=self.arch.spatial_merge_size,
                                      theta=self.arch.rope_theta).to(pixel_values.device)
        hidden = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [P, E]
        order = None
        if self.arch.is_qwen2_5:
            order, windows = window_order(grid_thw, window_size=self.arch.window_size, patch_size=self.arch.patch_size,
                                          spatial_merge_size=self.arch.spatial_merge_size)
            order = order.to(hidden.device)
            segments.window_cu_seqlens = windows.to(hidden.device)
            hidden, angles = self._by_unit(hidden, order), self._by_unit(angles, order)
        hidden = self.decoder(hidden.unsqueeze(1), attention_mask=None, rotary_pos_emb=angles,
                              packed_seq_params=segments)
        merged = self.merger(self.merger_norm(hidden.squeeze(1)).reshape(-1, self.arch.merged_width))
        return merged if order is None else merged[torch.argsort(order)]

    def _by_unit(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """``x`` [P, ...] regrouped by merged unit in ``order`` (spatial_merge_size^2 patches each)."""
        unit = self.arch.spatial_merge_size ** 2
        return x.reshape(x.shape[0] // unit, unit, *x.shape[1:])[order].reshape(x.shape)


class Qwen2VLModel(MegatronModule):
    """Qwen2-VL: :class:`Qwen2VisionModel` (first pipeline stage only) + a GPTModel with M-RoPE.
    A MegatronModule, so Megatron's distributed checkpointing saves and reshards it (the
    patch embedding and LayerNorms as replicated tensors).

    ``forward(input_ids [B, S], position_ids [3, B, S], attention_mask=None, labels=None,
    pixel_values=None, image_grid_thw=None, packed_seq_params=None)`` (GPTModel's order, so
    Megatron's schedule runs it) returns what the GPTModel returns: vocabulary-parallel
    logits [B, S, V_pad/TP] (last stage), the loss per token when ``labels`` are given, or
    hidden states (other stages). ``input_ids`` must hold one ``image_token_id`` per merged
    image token, images in order (row-major over the batch); ValueError otherwise. Packed
    sequences (THD, B = 1, ``packed_seq_params`` with ``qkv_format="thd"``): ``position_ids``
    [3, 1, T] hold each sequence's own M-RoPE positions (:func:`sequence_mrope_positions`);
    Megatron's THD RoPE then takes one rotary angle per token (its per-token mapping, used
    when the angles cover all T tokens), and attention stays within each sequence.
    """

    def __init__(self, *, vision_arch, language_model, pre_process: bool):
        super().__init__(config=language_model.config)
        self.vision_arch = vision_arch
        self.language_model = language_model
        self.vision = Qwen2VisionModel(vision_arch, language_config=language_model.config) if pre_process else None
        self.pre_process = pre_process
        self.model_type = language_model.model_type  # read by Megatron's pipeline schedules

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive hidden states (Megatron's schedule calls this)."""
        self.language_model.set_input_tensor(input_tensor)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """Whether the word embedding and output layer are tied; read by Megatron's
        ``finalize_model_grads`` on the stage that has ``pre_process`` (this module)."""
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        """The tied weight this stage holds (``finalize_model_grads`` all-reduces its gradient
        between the first and last pipeline stages)."""
        return self.language_model.shared_embedding_or_output_weight()

    def _embeddings(self, input_ids, pixel_values, image_grid_thw) -> torch.Tensor:
        embeds = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        is_image = input_ids == self.vision_arch.image_token_id  # [B, S]
        if pixel_values is None:
            if bool(is_image.any()):
                raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens but no pixel_values were given")
            return embeds
        images = self.vision(pixel_values, image_grid_thw)
        if int(is_image.sum()) != images.shape[0]:
            raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens, the images give "
                             f"{images.shape[0]} embeddings")
        by_batch = embeds.transpose(0, 1).masked_scatter(is_image.unsqueeze(-1), images.to(embeds.dtype))
        return by_batch.transpose(0, 1).contiguous()

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, pixel_values=None,
                image_grid_thw=None, packed_seq_params=None):
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError("position_ids must be M-RoPE's [3, B, S] (mrope_position_ids), got "
                             f"{list(position_ids.shape)}")
        decoder_input = self._embeddings(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, packed_seq_params=packed_seq_params)


def build_qwen2_vl_model(arch, vision_arch, *, parallel_cfg, precision_cfg, padded_vocab: int):
    """This rank's part of a Qwen2-VL model (random weights; load them with
    :mod:`k15_megatron.checkpoint.vl_weights`). ``arch``: the language model's ModelArch;
    ``vision_arch``: its VisionArch. Requires Megatron's parallel state; ValueError when the
    vision heads do not divide by ``parallel.tensor`` or under sequence or context parallelism."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from k15_megatron.models.gpt import transformer_config
    from k15_megatron.models.specs import gpt_decoder_spec

    if vision_arch.num_heads % parallel_cfg.tensor:
        raise ValueError(f"parallel.tensor={parallel_cfg.tensor} does not divide the vision tower's "
                         f"{vision_arch.num_heads} attention heads")
    if parallel_cfg.sequence_parallel or parallel_cfg.context > 1:
        raise ValueError("parallel.sequence_parallel and parallel.context > 1 are not supported with a "
                         "vision-language model (image embeddings replace whole-sequence token embeddings)")
    config = transformer_config(arch, parallel_cfg=parallel_cfg, precision_cfg=precision_cfg)
    config.mrope_section = list(vision_arch.mrope_section)
    pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False)
    language_model = GPTModel(
        config=config, transformer_layer_spec=gpt_decoder_spec(config), vocab_size=padded_vocab,
        max_sequence_length=arch.max_position_embeddings, pre_process=pre_process,
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False), parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="mrope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta)
    model = Qwen2VLModel(vision_arch=vision_arch, language_model=language_model, pre_process=pre_process)
    if HAVE_CUDA:
        model.cuda(torch.cuda.current_device())
    return model


def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor], *, image_token_id: int,
                       vision_start_token_id: int, spatial_merge_size: int) -> torch.Tensor:
    """M-RoPE position ids [3, B, S] (temporal, height, width) for ``input_ids`` [B, S].

    Text tokens get the same running index on all three axes. An image (the run of
    ``image_token_id`` after a ``vision_start_token_id``) of merged grid (t, h, w) gets
    (frame, row, column) offsets from the index the next text token would have had; the text
    after it continues from the image's largest position + 1. ``image_grid_thw`` [I, 3]
    (unmerged patch counts) lists the images in order over the batch. Source: transformers'
    ``Qwen2VLModel.get_rope_index`` (images only; no attention-mask padding).
    """
    batch, seq = input_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    m = spatial_merge_size
    for b in range(batch):
        ids = input_ids[b]
        image_starts = ((ids[1:] == image_token_id) & (ids[:-1] == vision_start_token_id)).nonzero().flatten() + 1
        pieces, start, done = [], 0, 0
        for first in image_starts.tolist():
            text = first - done
            pieces.append(torch.arange(start, start + text).expand(3, text))
            start += text
            t, h, w = next(grids)
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h // m), torch.arange(w // m), indexing="ij")
            pieces.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + start)
            start = int(pieces[-1].max()) + 1
            done = first + pieces[-1].shape[1]
        pieces.append(torch.arange(start, start + seq - done).expand(3, seq - done))
        positions[:, b] = torch.cat(pieces, dim=1)
    return positions


def sequence_mrope_positions(input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor], *,
                             vision_arch) -> torch.Tensor:
    """M-RoPE position ids [3, L] of ONE sequence ``input_ids`` [L] with its images'
    ``image_grid_thw`` [I, 3] (None: a text sequence), as :func:`mrope_position_ids` gives it
    alone; what a packed micro-batch carries per sequence (``vision_arch``: the VisionArch)."""
    return mrope_position_ids(input_ids.reshape(1, -1), image_grid_thw, image_token_id=vision_arch.image_token_id,
                              vision_start_token_id=vision_arch.vision_start_token_id,
                              spatial_merge_size=vision_arch.spatial_merge_size)[:, 0]
