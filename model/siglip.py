"""SigLIP vision tower and the multimodal projector that turns an image into encoder tokens.

pixel_values [N, 3, 896, 896] -> patch embeddings [N, 4096, C] -> pre-LN ViT blocks ->
post LayerNorm -> 4x4 average pool [N, 256, C] -> RMSNorm -> linear [N, 256, H].

Not here: image decoding and resizing (images.py), splicing the tokens into the prompt
(t5gemma2.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import T5Gemma2Config, VisionConfig
from .layers import FusedLinear, RMSNorm


class VisionBlock(nn.Module):
    """Pre-LayerNorm ViT block with biased projections and a tanh-GELU MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        width = cfg.hidden_size
        # q|k|v as one matmul (checkpoints keep q_proj, k_proj, v_proj apart; the loader joins them).
        self.qkv_proj = FusedLinear(width, {"q_proj": width, "k_proj": width, "v_proj": width}, bias=True)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, patches, width = x.shape
        heads = lambda t: t.view(batch, patches, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = self.qkv_proj(self.layer_norm1(x)).chunk(3, dim=-1)  # [N, P, C] each
        # Every patch sees every patch: no mask, so SDPA's fused kernels apply on GPU.
        attn = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        x = x + self.out_proj(attn.transpose(1, 2).reshape(batch, patches, width))  # [N, P, C]
        h = self.fc2(F.gelu(self.fc1(self.layer_norm2(x)), approximate="tanh"))
        return x + h


class VisionTower(nn.Module):
    """SigLIP vision transformer without its pooling head: [N, 3, S, S] -> [N, P, C]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side ** 2, cfg.hidden_size)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, C, p, p]
        x = x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # [N, P, C]
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


class MultiModalProjector(nn.Module):
    """Average-pool the patch grid to mm_tokens_per_image tokens and project into the text width."""

    def __init__(self, cfg: T5Gemma2Config):
        super().__init__()
        vision = cfg.vision
        self.patches_per_side = vision.patches_per_side
        self.kernel = vision.patches_per_side // int(cfg.mm_tokens_per_image ** 0.5)
        self.mm_soft_emb_norm = RMSNorm(vision.hidden_size, vision.layer_norm_eps)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision.hidden_size, cfg.hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        n, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(n, width, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)  # [N, T, C]
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight)  # [N, T, H]
