"""The T5Gemma 2 encoder-decoder, top to bottom.

    input_ids [B, S] --embed (x sqrt(H), end-of-image row replaced)--> [B, S, H]
      image placeholder rows <- SigLIP + projector features (siglip.py)
    encoder: bidirectional Gemma 3 blocks, sliding (local) and full (global) layers -> memory [B, S, H]
    decoder: causal Gemma 3 blocks whose attention is one softmax over
             [its own keys ; memory keys], the memory keys made by the same k/v projections
    tied LM head (the embedding table) -> optional tanh soft-cap -> logits [B, T, V]

`T5Gemma2.forward` is the teacher-forced pass (the reference's `.logits`). The pieces the
generator needs are public too: `encode`, `start_decoding` (the encoder's keys/values once per
request, into a DecoderCache), `decode_step` (one token per row against that cache) and
`lm_logits`.

Not here: loading weights (weights.py), caches and decoding loops (cache.py, generate.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import DecoderCache, LayerCache
from .config import T5Gemma2Config, TextConfig
from .layers import (
    AttentionProjections,
    GeGLU,
    LocalAttention,
    PackedCross,
    RMSNorm,
    Rotary,
    attention,
    decode_attention_flex,
    decode_sdpa,
    decoder_self_masks,
    grouped_decode_attention,
    key_padding_mask,
    length_groups,
    padded_widths,
    window_band_mask,
)
from .siglip import MultiModalProjector, VisionTower


def prompt_problem(config: T5Gemma2Config, input_ids: Sequence[int], pixel_values: torch.Tensor | None) -> str | None:
    """Why a prompt (token ids, image placeholders expanded) and its images cannot be encoded, or None:
    the check the Generator and the Scorer make of every request before it runs."""
    if len(input_ids) == 0:
        return "empty prompt: input_ids has no tokens"
    if min(input_ids) < 0 or max(input_ids) >= config.vocab_size:
        return f"token id out of range [0, {config.vocab_size})"
    n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
    slots = sum(1 for t in input_ids if t == config.image_token_id)
    if slots != n_images * config.mm_tokens_per_image:
        return (f"{slots} image-token positions for {n_images} image(s) x {config.mm_tokens_per_image} tokens: "
                f"expand each image placeholder with the tokenizer")
    if n_images:
        size, channels = config.vision.image_size, config.vision.num_channels
        if tuple(pixel_values.shape[1:]) != (channels, size, size):
            return f"pixel_values must be [N, {channels}, {size}, {size}]"
    return None


class ScaledEmbedding(nn.Module):
    """Token table shared by encoder, decoder and LM head; rows scaled by sqrt(H).

    The end-of-image token does not use its table row: it gets its own learned vector
    (unscaled), as the released checkpoints were trained.
    """

    def __init__(self, vocab: int, hidden: int, eoi_token_id: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, hidden))
        self.eoi_embedding = nn.Parameter(torch.zeros(hidden))
        self.eoi_token_id = eoi_token_id
        self.scale = hidden ** 0.5
        self._rounded_scale: dict[torch.dtype, float] = {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # The scale is rounded to the table's dtype first, as the checkpoints were run.
        dtype = self.weight.dtype
        if dtype not in self._rounded_scale:
            self._rounded_scale[dtype] = torch.tensor(self.scale, dtype=dtype).item()
        embeds = self.weight[ids] * self._rounded_scale[dtype]  # [..., H]
        return torch.where((ids == self.eoi_token_id)[..., None], self.eoi_embedding.to(embeds.dtype), embeds)


class Packing:
    """The encoder's two layouts: one packed row of the N real tokens, and padded attention groups.

    Token-wise work (projections, MLP, norms) runs packed, so padding costs nothing there.
    Attention needs a padded [rows, S, S] layout, whose cost grows with the square of the
    longest row; so consecutive rows are cut into groups of similar length, each padded only to
    its own longest row (rows sorted by length, as the generator sends them, make tight groups;
    any order is still correct). A group grows while its padded area stays within
    `GROUP_WASTE` x the area its rows need, or below `GROUP_MIN_AREA` (tiny groups cost more in
    per-call overhead than they save).

    Sliding-window layers can skip the padded layout altogether: where prompts are long next to the
    window (the window's keys per token cost less than the groups' padded area), they attend over
    the packed row itself, block by block, each token seeing only its own prompt's keys
    (`packed_sliding`, a LocalAttention with segments): no padding, no scatter into groups and back.
    """

    GROUP_WASTE = 1.5
    GROUP_MIN_AREA = 16384
    LOCAL_FROM = 4  # a group wider than this many windows runs its sliding layers as LocalAttention

    def __init__(self, padding: torch.Tensor, window: int, dtype: torch.dtype):
        self.batch, self.steps = padding.shape
        self.index = padding.reshape(-1).nonzero()[:, 0]  # [N] flat positions of real tokens
        lengths = padding.sum(1).tolist()
        cuts = length_groups(padded_widths(padding), lambda w: w * w, self.GROUP_WASTE, self.GROUP_MIN_AREA)
        self.packed_sliding: LocalAttention | None = None  # sliding layers over the packed row, when cheaper
        if self._packed_is_cheaper(cuts, sum(lengths), window):
            segments = (self.index // self.steps)[None]  # [1, N]: the prompt of each packed token
            self.packed_sliding = LocalAttention(torch.ones_like(segments, dtype=torch.bool), window, dtype, segments)
        self.groups = []  # (first token, end token, rows, padded width, masks per layer type, token slots)
        token = 0
        for first, end, width in cuts:
            count = sum(lengths[first:end])
            group = padding[first:end, : max(1, width)]  # [b, S_g]
            masks = {"full_attention": key_padding_mask(group, dtype)}
            if self.packed_sliding is None:
                long = group.shape[1] > self.LOCAL_FROM * window  # sliding layers then attend block by block
                masks["sliding_attention"] = (LocalAttention(group, window, dtype) if long
                                              else window_band_mask(group, window, dtype))
            slots = group.reshape(-1).nonzero()[:, 0]  # where each of the group's tokens sits in [b * S_g]
            self.groups.append((token, token + count, end - first, group.shape[1], masks, slots))
            token += count

    @classmethod
    def _packed_is_cheaper(cls, cuts: list[tuple[int, int, int]], tokens: int, window: int) -> bool:
        """Whether sliding layers read fewer keys over the packed row than in the padded groups `cuts`.

        Keys scored: packed, every token (in blocks of `window`) scores the 2 x window - 1 keys its block
        reaches; grouped, a row of a group scores width^2 (dense band), or as many as packed per padded
        token where the group is long enough to attend block by block itself."""
        reach = 2 * window - 1
        packed = -(-tokens // window) * window * reach
        grouped = sum((end - first) * (width * width if width <= cls.LOCAL_FROM * window
                                       else -(-width // window) * window * reach)
                      for first, end, width in cuts)
        return 0 < packed < grouped

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [1, N, ...]."""
        return x.reshape(self.batch * self.steps, *x.shape[2:])[self.index][None]

    def unpack_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N, H] -> [B, S, H] with zeros at padding."""
        out = x.new_zeros(self.batch * self.steps, x.shape[-1])
        out[self.index] = x[0]
        return out.view(self.batch, self.steps, -1)

    def attention(self, qk: torch.Tensor, v: torch.Tensor, heads: int, kind: str, scale: float) -> torch.Tensor:
        """Packed qk [1, N, Hq + Hkv, D], v [1, N, Hkv, D] -> attention output [1, N, Hq * D], group by group."""
        if kind == "sliding_attention" and self.packed_sliding is not None:
            qk_t, v_t = qk.transpose(1, 2), v.transpose(1, 2)  # [1, Hq + Hkv, N, D], [1, Hkv, N, D]
            out = self.packed_sliding(qk_t[:, :heads], qk_t[:, heads:], v_t, scale)  # [1, Hq, N, D]
            return out.transpose(1, 2).reshape(1, out.shape[2], -1)
        outputs = []
        for start, end, rows, width, masks, slots in self.groups:
            qk_g = _scatter_rows(qk[0, start:end], slots, rows, width)  # [b, Hq + Hkv, S_g, D]
            v_g = _scatter_rows(v[0, start:end], slots, rows, width)
            mask = masks[kind]
            if isinstance(mask, LocalAttention):
                out = mask(qk_g[:, :heads], qk_g[:, heads:], v_g, scale)  # [b, Hq, S_g, D]
            else:
                out = attention(qk_g[:, :heads], qk_g[:, heads:], v_g, mask, scale)
            outputs.append(out.transpose(1, 2).reshape(rows * width, -1)[slots])
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs))[None]


def _scatter_rows(tokens: torch.Tensor, slots: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """[n, h, D] tokens -> [rows, h, width, D] at their slots of the flat [rows * width], zeros elsewhere."""
    out = tokens.new_zeros(rows * width, *tokens.shape[1:])
    out[slots] = tokens
    return out.view(rows, width, *tokens.shape[1:]).transpose(1, 2)


# An encoder block's token-wise halves, (attention_inputs, attention_output) as functions of (block, ...):
# a caller may pass compiled ones (the Generator does on CPU), while the attention between them, whose
# length groups are Python lists, stays eager.
EncoderParts = tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], Callable[..., torch.Tensor]]


class Block(nn.Module):
    """Gemma 3 block: norm -> attention -> norm, residual; norm -> GeGLU -> norm, residual."""

    def __init__(self, cfg: TextConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.pre_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = AttentionProjections(cfg)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GeGLU(cfg.hidden_size, cfg.intermediate_size)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        # residual added into the fresh branch output (same sum, one tensor fewer)
        return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))).add_(x)

    def attention_inputs(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Norm, then q/k/v with rotary. x [1, N, H] -> [1, N, Hq + Hkv, D], [1, N, Hkv, D]."""
        return self.self_attn.qkv(self.pre_self_attn_layernorm(x), cos, sin)

    def attention_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block after its attention: out [1, N, Hq * D] and the residual x [1, N, H] -> [1, N, H]."""
        x = self.post_self_attn_layernorm(self.self_attn.o_proj(out)).add_(x)
        return self.feed_forward(x)

    def encode(self, x: torch.Tensor, cos, sin, packing: Packing, parts: EncoderParts | None = None) -> torch.Tensor:
        """Encoder block over packed tokens. x [1, N, H] (real tokens only); parts: the token-wise
        halves around the attention as given (compiled ones, say), else the methods above."""
        inputs, output = parts or (Block.attention_inputs, Block.attention_output)
        attn = self.self_attn
        qk, v = inputs(self, x, cos, sin)  # [1, N, Hq + Hkv, D], [1, N, Hkv, D]
        out = packing.attention(qk, v, attn.num_heads, self.layer_type, attn.scale)  # [1, N, Hq * D]
        return output(self, out, x)  # [1, N, H]

    def decode(self, x: torch.Tensor, cos, sin, self_mask: torch.Tensor, cross: tuple[torch.Tensor, torch.Tensor],
               cross_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder block. x [B, T, H]; self_mask [B, T, T]; cross k/v [B, Hkv, S, D]; cross_mask [B, S].

        One softmax over [own keys ; encoder keys], as the reference computes it; here the keys are
        joined once for the whole sequence (the generator never joins them: see cache.py).
        """
        attn = self.self_attn
        qk, v = attn.qkv(self.pre_self_attn_layernorm(x), cos, sin)
        qk = qk.transpose(1, 2)  # [B, Hq + Hkv, T, D]
        keys = torch.cat((qk[:, attn.num_heads :], cross[0]), dim=2)  # [B, Hkv, T + S, D]
        values = torch.cat((v.transpose(1, 2), cross[1]), dim=2)
        mask = torch.cat((self_mask, cross_mask[:, None, :].expand(-1, x.shape[1], -1)), dim=2)  # [B, T, T + S]
        out = attention(qk[:, : attn.num_heads], keys, values, mask, attn.scale)
        x = self.post_self_attn_layernorm(attn.out(out)).add_(x)
        return self.feed_forward(x)

    def decode_step(self, x: torch.Tensor, cos, sin, cache: LayerCache, slot: torch.Tensor, mask: torch.Tensor,
                    groups: list[tuple[int, int, int]],
                    flex: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One cached decoder step. x [B, 1, H]; cos, sin [P, 1, 1, D]; slot [P] (long: where this
        step's key goes; P = 1 for rows in lockstep, B for rows at their own positions);
        mask [B, 1, 1, size + S] -> [B, 1, H].

        groups: (first row, end row, keys to read) runs that attend separately (see cache.py), or the
        same as a tensor of (first row, end row, encoder width) (DecoderCache.group_table);
        flex: (position [P], encoder lengths [B]) to attend with FlexAttention instead of mask and groups.
        """
        attn = self.self_attn
        batch = x.shape[0]
        heads, kv_heads = attn.num_heads, attn.num_kv_heads
        qk, v = attn.qkv(self.pre_self_attn_layernorm(x), cos, sin)  # [B, 1, Hq + Hkv, D], [B, 1, Hkv, D]
        keys, values = cache.store(slot, qk[:, 0, heads:], v[:, 0])  # [B, Hkv, size + S, D]
        # The query heads of one kv head attend as a group: [B, Hkv, G, D] reads each key once.
        q = qk[:, 0, :heads].view(batch, kv_heads, heads // kv_heads, attn.head_dim)
        if flex is not None:  # (position, encoder lengths): only real keys read, no mask (compiled steps)
            out = decode_attention_flex(q, keys, values, cache.size, *flex, attn.scale)
        elif isinstance(groups, torch.Tensor):  # compiled CPU steps: the groups are data, not graph constants
            out = grouped_decode_attention(q, keys, values, mask, groups, cache.size, attn.scale)
        elif len(groups) == 1:
            out = decode_sdpa(q, keys, values, mask, attn.scale)  # [B, Hkv, G, D]
        else:
            out = torch.cat([decode_sdpa(q[a:b], keys[a:b, :, :end], values[a:b, :, :end], mask[a:b, ..., :end],
                                         attn.scale) for a, b, end in groups])
        x = self.post_self_attn_layernorm(attn.o_proj(out.reshape(batch, 1, heads * attn.head_dim))).add_(x)
        return self.feed_forward(x)


class TextStack(nn.Module):
    """Blocks, their rotary tables per layer type, and the final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        kinds = sorted(set(cfg.layer_types))
        self.rotary = nn.ModuleDict({kind: Rotary(cfg.head_dim, cfg.rope[kind]) for kind in kinds})

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        return {kind: rot.cos_sin(positions, dtype) for kind, rot in self.rotary.items()}


class T5Gemma2(nn.Module):
    """T5Gemma 2 for conditional generation (encoder, decoder, vision tower, tied LM head)."""

    def __init__(self, config: T5Gemma2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size, config.eoi_token_id)
        self.encoder = TextStack(config.encoder)
        self.decoder = TextStack(config.decoder)
        self.vision_tower = VisionTower(config.vision)
        self.projector = MultiModalProjector(config)

    # ---- encoder side ------------------------------------------------------------------------

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> image tokens [N, mm_tokens_per_image, H]."""
        return self.projector(self.vision_tower(pixel_values))

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        parts: EncoderParts | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask [B, S] (right-padded) -> memory [B, S, H].

        Images fill the image-token positions in row-major order: pass pixel_values
        [N, 3, S, S] or precomputed image_features [N, mm_tokens_per_image, H]. parts: every block's
        token-wise halves (Block.encode), e.g. compiled.

        Memory grows linearly with the prompt length S, up to the 128K context: token-wise work holds
        [N, width] tensors (the largest the MLP's [N, 2 x intermediate]); full-attention layers give
        SDPA a [b, 1, 1, S] key mask, so its fused kernel keeps the [S, S] scores out of memory; sliding
        layers attend in LocalAttention blocks ([S / w, w, 2w - 1] masks) over the packed row or, in groups
        wider than LOCAL_FROM windows, per row (see Packing). No [S, S] tensor is made
        (tests/model/test_encoder_memory.py). Measured in docs/perf.md, "Long documents": at the bench's
        small shape on CPU, 1.00 GiB peak for 32K tokens, 2.98 GiB for 128K.
        """
        padding = attention_mask.bool()
        dtype = self.embed_tokens.weight.dtype
        packing = Packing(padding, self.config.encoder.sliding_window, dtype)
        ids = packing.pack(input_ids)  # [1, N]: only real tokens are embedded
        x = self.embed_tokens(ids)  # [1, N, H]
        if pixel_values is not None:
            image_features = self.embed_images(pixel_values)
        if image_features is not None:
            slots = ids == self.config.image_token_id  # [1, N], row-major as the images are
            if int(slots.sum()) != image_features.shape[0] * image_features.shape[1]:
                raise ValueError(
                    f"{int(slots.sum())} image-token positions but {image_features.shape[0]} images x "
                    f"{image_features.shape[1]} tokens: expand each image placeholder with the tokenizer"
                )
            x = x.masked_scatter(slots[..., None], image_features.to(x.dtype))
        positions = torch.arange(input_ids.shape[1], device=x.device).expand_as(input_ids)
        angles = self.encoder.angles(packing.pack(positions), x.dtype)  # [1, N, 1, D] per type
        for layer in self.encoder.layers:
            cos, sin = angles[layer.layer_type]
            x = layer.encode(x, cos, sin, packing, parts)
        return packing.unpack_tokens(self.encoder.norm(x))  # [B, S, H], zeros at padding

    def cross_kv(self, memory: torch.Tensor, padding: torch.Tensor | None = None, packed: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor] | PackedCross]:
        """memory [B, S, H] -> per decoder layer (k, v) [B, Hkv, S, D], lazily, one layer at a time.

        padding [B, S] (True = real token), on CPU: the projections run on the real tokens only (a
        quarter of a padded batch's on the bench's prompts), and with `packed` they come as PackedCross
        (the real tokens' keys and values, for a cache to write in place). Not on a GPU, where finding them
        is a device read and the padding's share of a cheap matmul costs less."""
        if padding is None or memory.device.type != "cpu":
            return (layer.self_attn.cross_kv(memory) for layer in self.decoder.layers)
        rows, positions = padding.nonzero().unbind(1)
        tokens = memory[rows, positions]  # [N, H]
        if packed:
            return (layer.self_attn.cross_kv_packed(tokens, rows, positions) for layer in self.decoder.layers)
        return (layer.self_attn.cross_kv(memory, (tokens, rows, positions)) for layer in self.decoder.layers)

    # ---- decoder side ------------------------------------------------------------------------

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        positions: torch.Tensor,
        self_masks: dict[str, torch.Tensor],
        cross: Sequence[tuple[torch.Tensor, torch.Tensor]],
        cross_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced decoder: tokens [B, T] at positions [B, T] -> final hidden states [B, T, H].

        self_masks: layer type -> [B, T, T]; cross: per layer (k, v) [B, Hkv, S, D]; cross_mask [B, S].
        """
        x = self.embed_tokens(decoder_input_ids)
        angles = self.decoder.angles(positions, x.dtype)
        for layer, kv in zip(self.decoder.layers, cross):
            cos, sin = angles[layer.layer_type]
            x = layer.decode(x, cos, sin, self_masks[layer.layer_type], kv, cross_mask)
        return self.decoder.norm(x)

    def start_decoding(self, memory: torch.Tensor, attention_mask: torch.Tensor, max_steps: int,
                       repeat: int = 1, widths: list[int] | None = None, split: bool = True,
                       per_row: bool = False, flex: bool = False, table: bool = False) -> DecoderCache:
        """The decoder state for generating up to max_steps tokens from memory [B, S, H].

        The encoder's keys/values are computed here, once per request and layer, each row
        repeated `repeat` times (beam search) -> a cache of B * repeat rows. widths: each row's
        encoder width (last real token + 1) if the caller knows it (saves a device read); split:
        whether a step may attend in row groups of similar length (see cache.py); per_row: a position
        per row, so rows can be refilled (DecoderCache.refill); flex: steps attend with FlexAttention
        (layers.decode_attention_flex: only real keys, no mask; for compiled steps); table: the groups also as
        data (DecoderCache.group_table: for compiled CPU steps). The rotary
        tables of all max_steps positions are built here, before the first step.
        """
        mask = attention_mask.bool()
        cross = self.cross_kv(memory, mask, packed=repeat == 1)
        if repeat > 1:
            cross = ((k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for k, v in cross)
            mask = mask.repeat_interleave(repeat, 0)
            widths = None if widths is None else [w for w in widths for _ in range(repeat)]
        positions = torch.arange(max_steps, device=memory.device)
        return DecoderCache(self.config.decoder, cross, mask, max_steps, self.decoder.angles(positions, memory.dtype),
                            widths=widths, split=split, per_row=per_row, flex=flex, table=table)

    def decode_step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """tokens [B] at position cache.position -> final hidden states [B, H]; the cache then holds the step.

        Reads no Python value that changes from step to step (see cache.py): the same graph at every position.
        """
        x = self.embed_tokens(tokens[:, None])  # [B, 1, H]
        angles, slots = cache.begin_step()
        flex = (cache.position, cache.lengths) if cache.flex else None
        for layer, layer_cache in zip(self.decoder.layers, cache.layers):
            kind = layer.layer_type
            cos, sin = angles[kind]
            groups = cache.groups[kind] if cache.group_table is None else cache.group_table
            x = layer.decode_step(x, cos, sin, layer_cache, slots[kind], cache.masks[kind], groups, flex)
        cache.advance()
        return self.decoder.norm(x[:, 0])

    def lm_logits(self, hidden: torch.Tensor, softcap: bool = True) -> torch.Tensor:
        """[..., H] -> [..., V] through the tied table, in the model dtype, soft-capped when the config
        says so and `softcap` is on (greedy skips it: tanh is monotonic, so the argmax is the same)."""
        logits = F.linear(hidden, self.embed_tokens.weight)
        cap = self.config.decoder.final_logit_softcapping
        if cap is not None and softcap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for decoder_input_ids [B, T] (starting with the bos id)."""
        memory = self.encode(input_ids, attention_mask, pixel_values)
        steps = decoder_input_ids.shape[1]
        positions = torch.arange(steps, device=memory.device).expand_as(decoder_input_ids)
        masks = decoder_self_masks(positions, positions, self.config.decoder.sliding_window)
        hidden = self.decode(decoder_input_ids, positions, masks, list(self.cross_kv(memory)), attention_mask.bool())
        return self.lm_logits(hidden)

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (rotary tables) on the parameters' device.

        Needed after building on the meta device and assigning loaded weights.
        """
        device = self.embed_tokens.weight.device
        for stack in (self.encoder, self.decoder):
            for kind in list(stack.rotary):
                stack.rotary[kind] = Rotary(stack.cfg.head_dim, stack.cfg.rope[kind]).to(device)
