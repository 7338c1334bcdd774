"""The T5Gemma 2 encoder-decoder, top to bottom.

    input_ids [B, S] --embed (x sqrt(H), end-of-image row replaced)--> [B, S, H]
      image placeholder rows <- SigLIP + projector features (siglip.py)
    encoder: bidirectional Gemma 3 blocks, sliding (local) and full (global) layers -> memory [B, S, H]
    decoder: causal Gemma 3 blocks whose attention is one softmax over
             [its own keys ; memory keys], the memory keys made by the same k/v projections
    tied LM head (the embedding table) -> optional tanh soft-cap -> logits [B, T, V]

`T5Gemma2.forward` is the teacher-forced pass (the reference's `.logits`). The pieces the
generator needs are public too: `encode`, `cross_kv` (once per request), `decode` (one or
more steps against caller-owned caches) and `lm_logits`.

Not here: loading weights (weights.py), caches and decoding loops (cache.py, generate.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from .config import T5Gemma2Config, TextConfig
from .layers import (
    GeGLU,
    AttentionProjections,
    RMSNorm,
    Rotary,
    attention,
    decoder_self_masks,
    encoder_masks,
    merged_attention,
)
from .siglip import MultiModalProjector, VisionTower

# A decoder layer's cache hook: takes the new k, v [B, Hkv, T, D], stores them, and returns
# the keys/values the step attends to (cache contents, new entries included).
CacheUpdate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # The scale is rounded to the table's dtype first, as the checkpoints were run.
        scale = torch.tensor(self.scale, dtype=self.weight.dtype, device=self.weight.device)
        embeds = self.weight[ids] * scale  # [..., H]
        return torch.where((ids == self.eoi_token_id)[..., None], self.eoi_embedding.to(embeds.dtype), embeds)


class Packing:
    """Moves tensors between the padded [B, S] layout and one packed row of the N real tokens."""

    def __init__(self, padding: torch.Tensor):
        self.batch, self.steps = padding.shape
        self.index = padding.reshape(-1).nonzero()[:, 0]  # [N] flat positions of real tokens

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [1, N, ...]."""
        return x.reshape(self.batch * self.steps, *x.shape[2:])[self.index][None]

    def unpack_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N, H] -> [B, S, H] with zeros at padding."""
        out = x.new_zeros(self.batch * self.steps, x.shape[-1])
        out[self.index] = x[0]
        return out.view(self.batch, self.steps, -1)

    def pad(self, heads: torch.Tensor) -> torch.Tensor:
        """[1, h, N, D] -> [B, h, S, D] with zeros at padding."""
        _, h, _, d = heads.shape
        out = heads.new_zeros(self.batch * self.steps, h, d)
        out[self.index] = heads[0].transpose(0, 1)
        return out.view(self.batch, self.steps, h, d).transpose(1, 2)

    def unpad(self, heads: torch.Tensor) -> torch.Tensor:
        """[B, h, S, D] -> [1, h, N, D]."""
        batch, h, steps, d = heads.shape
        return heads.transpose(1, 2).reshape(batch * steps, h, d)[self.index].transpose(0, 1)[None]


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
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def encode(self, x: torch.Tensor, cos, sin, mask: torch.Tensor, packing: "Packing") -> torch.Tensor:
        """Encoder block over packed tokens. x [1, N, H] (real tokens only), mask [B, S, S]."""
        attn = self.self_attn
        q, k, v = attn.qkv(self.pre_self_attn_layernorm(x), cos, sin)  # [1, heads, N, D]
        out = attention(packing.pad(q), packing.pad(k), packing.pad(v), mask, attn.scale)  # [B, Hq, S, D]
        x = x + self.post_self_attn_layernorm(attn.out(packing.unpad(out)))
        return self.feed_forward(x)

    def decode(
        self,
        x: torch.Tensor,
        cos,
        sin,
        self_mask: torch.Tensor,
        cross: tuple[torch.Tensor, torch.Tensor],
        cross_mask: torch.Tensor,
        cache: CacheUpdate | None,
    ) -> torch.Tensor:
        """Decoder block with merged attention. x [B, T, H]; self_mask [B, T, S1]; cross k/v [B, Hkv, S2, D]."""
        attn = self.self_attn
        q, k, v = attn.qkv(self.pre_self_attn_layernorm(x), cos, sin)
        if cache is not None:
            k, v = cache(k, v)  # [B, Hkv, S1, D]: everything this step may attend to
        out = merged_attention(q, k, v, self_mask, cross[0], cross[1], cross_mask, attn.scale)
        x = x + self.post_self_attn_layernorm(attn.out(out))
        return self.feed_forward(x)


class TextStack(nn.Module):
    """Blocks, their rotary tables per layer type, and the final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = nn.ModuleDict({kind: Rotary(cfg.head_dim, cfg.rope[kind]) for kind in sorted(set(cfg.layer_types))})

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
    ) -> torch.Tensor:
        """input_ids, attention_mask [B, S] (right-padded) -> memory [B, S, H].

        Images fill the image-token positions in row-major order: pass pixel_values
        [N, 3, S, S] or precomputed image_features [N, mm_tokens_per_image, H].
        """
        x = self.embed_tokens(input_ids)  # [B, S, H]
        if pixel_values is not None:
            image_features = self.embed_images(pixel_values)
        if image_features is not None:
            slots = input_ids == self.config.image_token_id  # [B, S]
            if int(slots.sum()) != image_features.shape[0] * image_features.shape[1]:
                raise ValueError(
                    f"{int(slots.sum())} image-token positions but {image_features.shape[0]} images x "
                    f"{image_features.shape[1]} tokens: expand each image placeholder with the tokenizer"
                )
            x = x.masked_scatter(slots[..., None], image_features.to(x.dtype))
        # Token-wise work (projections, MLP, norms) runs on the real tokens only, packed into
        # one row; only attention sees the padded [B, S] layout. Padding costs nothing there.
        padding = attention_mask.bool()
        packing = Packing(padding)
        positions = torch.arange(input_ids.shape[1], device=x.device).expand_as(input_ids)
        angles = self.encoder.angles(packing.pack(positions), x.dtype)  # [1, 1, N, D] per type
        masks = encoder_masks(padding, self.config.encoder.sliding_window)
        x = packing.pack(x)  # [1, N, H]
        for layer in self.encoder.layers:
            cos, sin = angles[layer.layer_type]
            x = layer.encode(x, cos, sin, masks[layer.layer_type], packing)
        return packing.unpack_tokens(self.encoder.norm(x))  # [B, S, H], zeros at padding

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """memory [B, S, H] -> per decoder layer (k, v) [B, Hkv, S, D], computed once per request."""
        return [layer.self_attn.cross_kv(memory) for layer in self.decoder.layers]

    # ---- decoder side ------------------------------------------------------------------------

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        positions: torch.Tensor,
        self_masks: dict[str, torch.Tensor],
        cross: Sequence[tuple[torch.Tensor, torch.Tensor]],
        cross_mask: torch.Tensor,
        caches: Sequence[CacheUpdate] | None = None,
    ) -> torch.Tensor:
        """Decoder tokens [B, T] at positions [B, T] -> final hidden states [B, T, H].

        self_masks: layer type -> [B, T, S1] over the keys each layer attends to (the new
        tokens' own keys without caches, the cache slots with them); cross_mask [B, S2].
        """
        x = self.embed_tokens(decoder_input_ids)
        angles = self.decoder.angles(positions, x.dtype)
        for i, layer in enumerate(self.decoder.layers):
            cos, sin = angles[layer.layer_type]
            cache = caches[i] if caches is not None else None
            x = layer.decode(x, cos, sin, self_masks[layer.layer_type], cross[i], cross_mask, cache)
        return self.decoder.norm(x)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V] through the tied table, soft-capped when the config says so."""
        logits = torch.matmul(hidden, self.embed_tokens.weight.t())
        cap = self.config.decoder.final_logit_softcapping
        if cap is not None:
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
        hidden = self.decode(decoder_input_ids, positions, masks, self.cross_kv(memory), attention_mask.bool())
        return self.lm_logits(hidden)

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (rotary tables) on the parameters' device.

        Needed after building on the meta device and assigning loaded weights.
        """
        device = self.embed_tokens.weight.device
        for stack in (self.encoder, self.decoder):
            for kind, rot in stack.rotary.items():
                stack.rotary[kind] = Rotary(stack.cfg.head_dim, stack.cfg.rope[kind]).to(device)
