"""Preallocated decoder state for one micro-batch: per layer, its own keys then the encoder's.

Every row of a micro-batch decodes in lockstep (step t is position t for all rows). Each
decoder layer owns one key buffer and one value buffer [B, Hkv, size + S, D]:

    slots [0, size)        the layer's own keys/values: full-attention layers keep max_steps
                           slots, sliding-window layers only `window` (a ring, slot t % window:
                           older keys are outside every later query's window)
    slots [size, size + S) the encoder's keys/values for this layer, written once when the
                           micro-batch starts and read in place at every step

so a decode step is one attention call over a buffer whose shape never changes while rows
decode, with an additive mask [B, 1, 1, size + S] per layer type (0 = visible, -inf = empty
slot or encoder padding). Rotary angles are applied before keys are stored, so ring order
does not matter to the softmax, and the order of keys never changes the softmax (a sum). Empty
slots cost a little compute until they fill; in exchange nothing is concatenated or copied per
step, and fixed shapes are what CUDA graph capture needs. When the rows' encoder lengths
differ a lot, the call is split into `groups` of consecutive rows, each reading only up to its
own longest encoder input (rows come sorted by length from the generator), so short rows do
not pay for the longest one.

Not here: the decoding loop (generate.py), the layer math (layers.py, t5gemma2.py).
"""

from __future__ import annotations

from typing import Iterable

import torch

from .config import TextConfig
from .layers import length_groups, padded_widths


class LayerCache:
    """Keys and values of one decoder layer: [B, Hkv, size + S, D], own slots first."""

    def __init__(self, size: int, cross: tuple[torch.Tensor, torch.Tensor]):
        k_cross, v_cross = cross  # [B, Hkv, S, D]
        batch, heads, steps, dim = k_cross.shape
        self.size = size
        # Zeros, not empty: an empty slot is masked out, but 0 * (garbage NaN) would still poison the sum.
        self.keys = k_cross.new_zeros(batch, heads, size + steps, dim)
        self.values = torch.zeros_like(self.keys)
        self.keys[:, :, size:] = k_cross
        self.values[:, :, size:] = v_cross

    def store(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v [B, Hkv, D] at `slot`; returns the whole buffers to attend over."""
        self.keys[:, :, slot] = k
        self.values[:, :, slot] = v
        return self.keys, self.values


class DecoderCache:
    """All decoder layers' buffers, the masks per layer type and the rotary tables of the steps."""

    GROUP_WASTE = 1.25  # a step's attention group may read this much padding (see length_groups)
    GROUP_MIN_KEYS = 4096  # rows x keys below which a group is not split further

    def __init__(
        self,
        cfg: TextConfig,
        cross: Iterable[tuple[torch.Tensor, torch.Tensor]],
        cross_mask: torch.Tensor,
        max_steps: int,
        angles: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ):
        """cross: per layer (k, v) [B, Hkv, S, D] (consumed one layer at a time, so an iterator keeps
        one layer's copy alive at most); cross_mask [B, S] True = real encoder token; angles:
        layer type -> (cos, signed sin) [max_steps, 1, D] for positions 0..max_steps-1."""
        self.sizes = {kind: min(cfg.sliding_window, max_steps) if kind == "sliding_attention" else max_steps
                      for kind in set(cfg.layer_types)}
        self.layers = [LayerCache(self.sizes[kind], kv) for kind, kv in zip(cfg.layer_types, cross)]
        if len(self.layers) != len(cfg.layer_types):
            raise ValueError(f"cross keys/values for {len(self.layers)} layers, the decoder has {len(cfg.layer_types)}")
        dtype = self.layers[0].keys.dtype
        self.cross_mask = cross_mask  # [B, S] bool
        encoder = torch.zeros(cross_mask.shape, dtype=dtype, device=cross_mask.device).masked_fill(
            ~cross_mask, float("-inf"))
        self.masks = {  # own slots start empty (-inf) and open as they are written
            kind: torch.cat((encoder.new_full((cross_mask.shape[0], size), float("-inf")), encoder), 1)[:, None, None]
            for kind, size in self.sizes.items()
        }  # [B, 1, 1, size + S]
        self.angles = angles
        self.step = 0
        self._group()

    def _group(self) -> None:
        """groups: layer type -> [(first row, end row, keys to read)] for the attention of a step."""
        own = max(self.sizes.values())
        widths = [max(1, w) for w in padded_widths(self.cross_mask)]
        runs = length_groups(widths, lambda w: own + w, self.GROUP_WASTE, self.GROUP_MIN_KEYS)
        self.groups = {kind: [(a, b, size + w) for a, b, w in runs] for kind, size in self.sizes.items()}

    def begin_step(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Open this step's own slot in the masks; returns (cos, sin) [1, D] per layer type for the step."""
        for kind, size in self.sizes.items():
            if self.step < size:  # a ring, once full, stays fully visible
                self.masks[kind][..., self.step] = 0.0
        return {kind: (cos[self.step], sin[self.step]) for kind, (cos, sin) in self.angles.items()}

    def slot(self, layer: LayerCache) -> int:
        return self.step % layer.size

    def advance(self) -> None:
        self.step += 1

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows at `rows` (drops finished rows); trims encoder padding no row needs."""
        self.cross_mask = self.cross_mask.index_select(0, rows)
        width = int(self.cross_mask.any(0).nonzero().max()) + 1 if self.cross_mask.any() else 1
        self.cross_mask = self.cross_mask[:, :width]
        for layer in self.layers:
            end = layer.size + width
            layer.keys = layer.keys[:, :, :end].index_select(0, rows)
            layer.values = layer.values[:, :, :end].index_select(0, rows)
        self.masks = {kind: m[..., : self.sizes[kind] + width].index_select(0, rows) for kind, m in self.masks.items()}
        self._group()

    def follow_beams(self, rows: torch.Tensor) -> None:
        """Own slots of row i <- those of row rows[i] (beams duplicated or dropped).

        The encoder part is equal across the beams of a request, so it stays where it is.
        """
        for layer in self.layers:
            own = slice(0, layer.size)
            layer.keys[:, :, own] = layer.keys[:, :, own].index_select(0, rows)
            layer.values[:, :, own] = layer.values[:, :, own].index_select(0, rows)
