"""Preallocated decoder caches for one micro-batch.

Every row of a micro-batch decodes in lockstep (step t is position t for all rows), so a
layer's cache is a plain buffer written at slot t and read as its first min(t+1, size)
slots: no per-row masks. Full-attention layers keep max_steps slots; sliding-window layers
keep only `window` slots as a ring (slot t % window), since older keys are outside every
later query's window. Rotary angles are applied before keys are stored, so ring order
does not matter to the softmax.

The encoder side (cross keys/values) is computed once per request by the model's
`cross_kv` and held here, never concatenated with the self keys or copied per step.

Not here: the decoding loop (generate.py), the attention math (layers.py).
"""

from __future__ import annotations

import torch

from .config import TextConfig


class LayerCache:
    """Self-attention keys/values of one decoder layer: [B, Hkv, size, D]."""

    def __init__(self, batch: int, kv_heads: int, size: int, head_dim: int, dtype, device):
        self.keys = torch.empty(batch, kv_heads, size, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.size = size
        self.step = 0

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, Hkv, 1, D]; return the slots the step attends to."""
        slot = self.step % self.size
        self.keys[:, :, slot : slot + 1] = k
        self.values[:, :, slot : slot + 1] = v
        filled = min(self.step + 1, self.size)
        return self.keys[:, :, :filled], self.values[:, :, :filled]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) the batch rows at indices `rows`: drops finished rows, follows beams."""
        self.keys = self.keys.index_select(0, rows)
        self.values = self.values.index_select(0, rows)


class DecoderCache:
    """All decoder layers' self caches plus the cross keys/values and encoder padding mask."""

    def __init__(
        self,
        cfg: TextConfig,
        cross: list[tuple[torch.Tensor, torch.Tensor]],
        cross_mask: torch.Tensor,
        max_steps: int,
    ):
        batch = cross_mask.shape[0]
        dtype, device = cross[0][0].dtype, cross[0][0].device
        self.layers = [
            LayerCache(
                batch,
                cfg.num_kv_heads,
                min(cfg.sliding_window, max_steps) if kind == "sliding_attention" else max_steps,
                cfg.head_dim,
                dtype,
                device,
            )
            for kind in cfg.layer_types
        ]
        self.cross = cross  # per layer (k, v) [B, Hkv, S, D]
        self.cross_mask = cross_mask  # [B, S] True = real encoder token

    @property
    def step(self) -> int:
        return self.layers[0].step

    def advance(self) -> None:
        for layer in self.layers:
            layer.step += 1

    def keep(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep(rows)
        self.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross]
        self.cross_mask = self.cross_mask.index_select(0, rows)
        # Trailing encoder positions that are padding in every kept row need not be read any more.
        width = int(self.cross_mask.any(0).nonzero().max()) + 1 if self.cross_mask.any() else 1
        if width < self.cross_mask.shape[1]:
            self.cross = [(k[:, :, :width], v[:, :, :width]) for k, v in self.cross]
            self.cross_mask = self.cross_mask[:, :width]
