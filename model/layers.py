"""Building blocks of the T5Gemma 2 text stacks: RMSNorm, rotary embedding, GeGLU MLP, attention.

The attention functions are plain tensor math over explicit boolean masks, so the same
code serves the teacher-forced forward pass and the cached decode step of the generator:
- `attention`: softmax(q k^T * scale) v under a mask, grouped-query heads without copying k/v.
- `merged_attention`: the decoder's one softmax over [self keys ; encoder keys], computed
  as two score blocks joined in the softmax, so the encoder keys/values are read where they
  lie (the cross cache) and never concatenated with the self keys.

Not here: how layers are stacked (t5gemma2.py), caches (cache.py), SigLIP (siglip.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RopeConfig, TextConfig


class RMSNorm(nn.Module):
    """Gemma RMSNorm: computed in float32, scaled by (1 + weight), cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in one fused kernel, then the (1 + weight) scale, both in
        # float32; cast down once at the end (as Gemma does), so bf16 rounding happens once.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class GeGLU(nn.Module):
    """Gated MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Rotary(nn.Module):
    """Rotary position embedding of one layer type (default or linearly scaled frequencies)."""

    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        inv_freq = 1.0 / (rope.theta ** exponents)
        if rope.scaling == "linear":
            inv_freq = inv_freq / rope.factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int) -> cos, sin [B, 1, T, head_dim] in `dtype`."""
        freqs = positions.float()[..., None] * self.inv_freq.float()  # [B, T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D] rotated by the angles in cos/sin [B, 1, T, D] (halves layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention under a boolean mask (the encoder's).

    q [B, Hq, T, D]; k, v [B, Hkv, S, D]; mask [B, T, S] (True = may attend) -> [B, Hq, T, D].
    PyTorch's fused attention kernels keep the [T, S] scores out of memory for long inputs.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def merged_attention(
    q: torch.Tensor,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    self_mask: torch.Tensor | None,
    k_cross: torch.Tensor,
    v_cross: torch.Tensor,
    cross_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One softmax over the decoder's own keys and the encoder's keys, without concatenating them.

    q [B, Hq, T, D]; k_self, v_self [B, Hkv, S1, D]; self_mask [B, T, S1] or None (all visible);
    k_cross, v_cross [B, Hkv, S2, D]; cross_mask [B, S2] -> [B, Hq, T, D].
    Joining the two score blocks before the softmax is exactly the reference's attention over
    the concatenated keys; only the (small) scores are concatenated, never the keys or values.
    """
    batch, heads, steps, dim = q.shape
    kv_heads = k_self.shape[1]
    groups = heads // kv_heads
    self_len = k_self.shape[2]
    qg = q.reshape(batch, kv_heads, groups * steps, dim)  # [B, Hkv, G*T, D]
    s_self = torch.matmul(qg, k_self.transpose(-1, -2)).view(batch, kv_heads, groups, steps, -1)
    s_cross = torch.matmul(qg, k_cross.transpose(-1, -2)).view(batch, kv_heads, groups, steps, -1)
    if self_mask is not None:
        s_self = s_self.masked_fill(~self_mask[:, None, None], float("-inf"))
    s_cross = s_cross.masked_fill(~cross_mask[:, None, None, None], float("-inf"))
    scores = torch.cat((s_self, s_cross), dim=-1) * scale  # [B, Hkv, G, T, S1+S2]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    p_self = probs[..., :self_len].reshape(batch, kv_heads, groups * steps, self_len)
    p_cross = probs[..., self_len:].reshape(batch, kv_heads, groups * steps, -1)
    out = torch.matmul(p_self, v_self) + torch.matmul(p_cross, v_cross)  # [B, Hkv, G*T, D]
    return out.view(batch, heads, steps, dim)


class AttentionProjections(nn.Module):
    """q/k/v/o projections with per-head q/k RMSNorm, shared by encoder and decoder blocks."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.scaling
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        batch, steps, _ = x.shape
        return x.view(batch, steps, n, self.head_dim).transpose(1, 2)  # [B, n, T, D]

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]; q, k normed and rotated."""
        q = apply_rotary(self.q_norm(self._heads(self.q_proj(x), self.num_heads)), cos, sin)
        k = apply_rotary(self.k_norm(self._heads(self.k_proj(x), self.num_kv_heads)), cos, sin)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        return q, k, v

    def cross_kv(self, memory: torch.Tensor):
        """Encoder output [B, S, H] -> k, v [B, Hkv, S, D]: k normed, no rotation (merged attention)."""
        k = self.k_norm(self._heads(self.k_proj(memory), self.num_kv_heads))
        v = self._heads(self.v_proj(memory), self.num_kv_heads)
        return k, v

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, Hq, T, D] -> [B, T, H]."""
        batch, _, steps, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(batch, steps, -1))


def encoder_masks(padding: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """Bidirectional masks [B, S, S] per layer type from a padding mask [B, S] (True = token).

    The sliding window is split as the reference does: (w+1)//2 keys to the left including
    the query itself, w//2 to the right. The diagonal is always allowed so that padding
    queries never see an empty row (their outputs are unused, but must stay finite).
    """
    steps = padding.shape[1]
    idx = torch.arange(steps, device=padding.device)
    dist = idx[:, None] - idx[None, :]  # q - kv, [S, S]
    in_window = ((dist >= 0) & (dist < (window + 1) // 2)) | ((dist < 0) & (-dist < window // 2 + 1))
    diagonal = dist == 0
    keys = padding[:, None, :]  # [B, 1, S]
    return {
        "full_attention": keys | diagonal,
        "sliding_attention": (keys & in_window) | diagonal,
    }


def decoder_self_masks(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """Causal masks [B, T, S] per layer type from query positions [B, T] and key positions [B, S].

    A key position < 0 marks an empty cache slot. Sliding layers see the last `window`
    positions including the query's own.
    """
    dist = query_pos[:, :, None] - key_pos[:, None, :]  # [B, T, S]
    causal = (dist >= 0) & (key_pos[:, None, :] >= 0)
    return {"full_attention": causal, "sliding_attention": causal & (dist < window)}
