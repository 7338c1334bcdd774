"""Preallocated decoder state for one micro-batch: per layer, its own keys then the encoder's.

Rows decode either in lockstep (beam search: step t is position t for all rows, one [1]
position) or each at its own position (`per_row`: a [B] position, so that a finished row's slot
can take in a new request, `refill`, which starts at position zero). Each decoder layer owns
one key buffer and one value buffer [B, Hkv, size + S, D]:

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
step, and fixed shapes are what CUDA graph capture needs.

Everything a step reads that changes from step to step lives on the device: the position is
a [1] tensor (`position`), ring slots are computed from it, the rotary angles are picked from
tables built before the first step (index_select), keys are written with index_copy_ and the
mask column of the step is opened with index_fill_. So a step is the same graph at every
position (what torch.compile and CUDA graphs need) and reads no Python value that changes.

When the rows' encoder lengths differ a lot, the call is split into `groups` of consecutive
rows, each reading only up to its own longest encoder input (rows come sorted by length from
the generator), so short rows do not pay for the longest one. The groups change only when rows
leave (`keep`) or are refilled, and are computed from host-side widths, so building them costs no
device read.
A compiled CPU step reads them as data (`group_table`, a small CPU tensor updated in place), so a
regroup changes no graph.

Not here: the decoding loop (generate.py), the layer math (layers.py, t5gemma2.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .config import TextConfig
from .layers import PackedCross, length_groups, padded_widths


class LayerCache:
    """Keys and values of one decoder layer: [B, Hkv, size + S, D], own slots first."""

    def __init__(self, size: int, cross: tuple[torch.Tensor, torch.Tensor] | PackedCross, batch: int, steps: int):
        """cross: the encoder's keys and values, [B, Hkv, S, D] each or packed (real tokens only) for
        `batch` rows of `steps` encoder positions."""
        self.size = size
        like = cross.keys if isinstance(cross, PackedCross) else cross[0]  # [N, Hkv, D] or [B, Hkv, S, D]
        heads, dim = like.shape[1], like.shape[-1]
        # Zeros, not empty: an empty slot is masked out, but 0 * (garbage NaN) would still poison the sum.
        self.keys = like.new_zeros(batch, heads, size + steps, dim)
        self.values = torch.zeros_like(self.keys)
        if isinstance(cross, PackedCross):
            cross.write(self.keys[:, :, size:], self.values[:, :, size:])
        else:
            self.keys[:, :, size:] = cross[0]
            self.values[:, :, size:] = cross[1]
        self.full = (self.keys, self.values)  # the buffers as allocated: keep(in_place) leaves views of them

    def store(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v [B, Hkv, D] at `slot` ([1] long tensor: every row's, or [B]: one per
        row); returns the whole buffers."""
        if slot.shape[0] == 1:
            self.keys.index_copy_(2, slot, k[:, :, None])
            self.values.index_copy_(2, slot, v[:, :, None])
        else:  # rows at their own positions (refilled rows start at zero)
            # An index_put of whole [Hkv, D] vectors: about half a scatter_'s time, which indexes every element.
            rows = torch.arange(k.shape[0], device=k.device)
            self.keys[rows, :, slot] = k
            self.values[rows, :, slot] = v
        return self.keys, self.values


class DecoderCache:
    """All decoder layers' buffers, the masks per layer type and the rotary tables of the steps."""

    GROUP_WASTE = 1.25  # a step's attention group may read this much padding (see length_groups)
    GROUP_MIN_KEYS = 4096  # rows x keys below which a group is not split further
    GROUP_TABLE_ROWS = 32  # most groups in group_table (a fixed shape); further ones join the last

    def __init__(
        self,
        cfg: TextConfig,
        cross: Iterable[tuple[torch.Tensor, torch.Tensor] | PackedCross],
        cross_mask: torch.Tensor,
        max_steps: int,
        angles: dict[str, tuple[torch.Tensor, torch.Tensor]],
        widths: Sequence[int] | None = None,
        split: bool = True,
        per_row: bool = False,
        flex: bool = False,
        table: bool = False,
    ):
        """cross: per layer (k, v) [B, Hkv, S, D] (consumed one layer at a time, so an iterator keeps
        one layer's copy alive at most); cross_mask [B, S] True = real encoder token; angles:
        layer type -> (cos, signed sin) [max_steps, 1, D] for positions 0..max_steps-1; widths:
        per row, the encoder width it needs (last real token + 1), known to the caller (read from
        cross_mask when None, one device read); split: allow attention in length groups (off for
        a compiled step, whose graph must not depend on the rows' lengths); per_row: each row has its
        own position (a [B] tensor, so rows can be refilled with new requests that start at zero),
        instead of one shared [1] position (beam search, whose rows decode in lockstep); flex: steps attend
        with FlexAttention over `lengths` and `position` (layers.decode_attention_flex), not the masks
        (kept all the same: a step that falls back to eager reads them); table: keep the groups also as
        data, `group_table` (see layers.grouped_decode_attention), so a compiled CPU step attends in
        groups without their changes changing its graph."""
        self.sizes = {kind: min(cfg.sliding_window, max_steps) if kind == "sliding_attention" else max_steps
                      for kind in set(cfg.layer_types)}
        self.layers = [LayerCache(self.sizes[kind], kv, *cross_mask.shape) for kind, kv in zip(cfg.layer_types, cross)]
        if len(self.layers) != len(cfg.layer_types):
            raise ValueError(f"cross keys/values for {len(self.layers)} layers, the decoder has {len(cfg.layer_types)}")
        dtype = self.layers[0].keys.dtype
        device = cross_mask.device
        self.widths = [max(1, w) for w in (padded_widths(cross_mask) if widths is None else widths)]
        self.split = split
        encoder = torch.zeros(cross_mask.shape, dtype=dtype, device=device).masked_fill(~cross_mask, float("-inf"))
        self.masks = {  # own slots start empty (-inf) and open as they are written
            kind: torch.cat((encoder.new_full((cross_mask.shape[0], size), float("-inf")), encoder), 1)[:, None, None]
            for kind, size in self.sizes.items()
        }  # [B, 1, 1, size + S]
        self.angles = angles
        self.max_steps = max_steps
        self.flex = flex
        self.lengths = cross_mask.sum(1)  # [B] long: each row's encoder length (its real keys are a prefix)
        # [1] (lockstep) or [B] (per row): the position each row decodes next.
        self.per_row = per_row
        self.position = torch.zeros(cross_mask.shape[0] if per_row else 1, dtype=torch.long, device=device)
        self._full = (dict(self.masks), self.position, self.lengths, list(self.widths))  # see restore()
        # [GROUP_TABLE_ROWS, 3] on the CPU: the groups as (first row, end row, encoder width), updated in place.
        self.group_table = torch.zeros((self.GROUP_TABLE_ROWS, 3), dtype=torch.long) if table else None
        self._group()

    def attend_by_masks(self, table: bool) -> None:
        """Steps from here on attend with SDPA over the masks (kept all along), not FlexAttention; table:
        with the groups also as data (compiled CPU steps), built now if the cache had none."""
        self.flex = False
        if table and self.group_table is None:
            self.group_table = torch.zeros((self.GROUP_TABLE_ROWS, 3), dtype=torch.long)
            self._group()

    def _group(self) -> None:
        """groups: layer type -> [(first row, end row, keys to read)] for the attention of a step."""
        own = max(self.sizes.values())
        if self.split:
            runs = length_groups(self.widths, lambda w: own + w, self.GROUP_WASTE, self.GROUP_MIN_KEYS)
        else:
            runs = [(0, len(self.widths), max(self.widths))]
        self.groups = {kind: [(a, b, size + w) for a, b, w in runs] for kind, size in self.sizes.items()}
        if self.group_table is not None:
            cap = self.GROUP_TABLE_ROWS
            if len(runs) > cap:  # one wider group for the rest: correct, only more padding read
                runs = runs[: cap - 1] + [(runs[cap - 1][0], runs[-1][1], max(w for _, _, w in runs[cap - 1:]))]
            self.group_table.zero_()
            self.group_table[: len(runs)] = torch.tensor(runs, dtype=torch.long)

    def begin_step(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """Open this step's own slot in the masks; returns per layer type the (cos, sin) [1, 1, D] of
        the step ([P, 1, 1, D], P = 1 or B rows) and its slot ([P] long tensor) in that type's own slots.

        Opening a slot of a ring that is already full writes 0 over 0: no branch on the position.
        """
        slots = {kind: self.position % size for kind, size in self.sizes.items()}
        if self.position.shape[0] > 1:  # per row: mask[row, 0, 0, slot[row]] = 0
            rows = torch.arange(self.position.shape[0], device=self.position.device)
            zeros, opened = torch.zeros_like(rows), torch.zeros((), dtype=self.layers[0].keys.dtype, device=rows.device)
        for kind, mask in self.masks.items():
            if self.position.shape[0] == 1:
                mask.index_fill_(-1, slots[kind], 0.0)
            else:
                # An index_put_ with an index per dim: in a graph, inductor writes it into the mask in
                # place (a scatter_ into this input copied the whole mask there and back at each step).
                mask.index_put_((rows, zeros, zeros, slots[kind]), opened)
        angles = {kind: (cos.index_select(0, self.position)[:, None], sin.index_select(0, self.position)[:, None])
                  for kind, (cos, sin) in self.angles.items()}
        return angles, slots

    def advance(self) -> None:
        self.position.add_(1)
        if self.per_row:
            # A finished row waiting for a refill keeps decoding; it stays on the last slot (the caller
            # keeps one slot past every row's max_new_tokens) rather than running off the tables.
            self.position.clamp_(max=self.max_steps - 1)

    def keep(self, rows: Sequence[int], multiple: int = 1, in_place: bool = False, trim: bool = True) -> None:
        """Keep only the batch rows at `rows` (host indices; drops finished rows) and, with `trim`, the encoder
        padding no kept row needs, to a multiple of `multiple` (a compiled step's bucket). Reads
        nothing back from the device. in_place: the kept rows move to the front of the buffers held now,
        which the cache then views (no new memory, and the addresses a captured CUDA graph recorded
        stay: see restore); otherwise they are copied into new, smaller buffers."""
        self.widths = [self.widths[r] for r in rows]
        encoder = self.layers[0].keys.shape[2] - self.layers[0].size  # the encoder length held now
        width = min(-(-max(self.widths) // multiple) * multiple, encoder) if trim else encoder
        index = torch.tensor(list(rows), dtype=torch.long, device=self.position.device)
        n = len(rows)

        def kept(t: torch.Tensor, dim: int | None = None, end: int = 0) -> torch.Tensor:
            """t's kept rows, trimmed to `end` along `dim`: new, or written to the front of t and viewed."""
            view = t if dim is None else t.narrow(dim, 0, end)
            picked = view.index_select(0, index)  # a copy: safe to write over the rows it came from
            return view[:n].copy_(picked) if in_place else picked

        for layer in self.layers:
            end = layer.size + width
            layer.keys, layer.values = kept(layer.keys, 2, end), kept(layer.values, 2, end)
        self.masks = {kind: kept(m, 3, self.sizes[kind] + width) for kind, m in self.masks.items()}
        if self.per_row:
            self.position = kept(self.position)
        self.lengths = kept(self.lengths)
        self._group()

    def restore(self) -> None:
        """Back to the buffers as allocated (all rows, the whole encoder width) after in-place keeps,
        so the cache can start a new run (refill of every row) at the same addresses."""
        for layer in self.layers:
            layer.keys, layer.values = layer.full
        masks, self.position, self.lengths, widths = self._full
        self.masks = dict(masks)
        self.widths = list(widths)
        self._group()

    def refill(self, rows: Sequence[int], cross: Iterable[tuple[torch.Tensor, torch.Tensor] | PackedCross],
               cross_mask: torch.Tensor, widths: Sequence[int]) -> None:
        """Start new requests in the batch rows at `rows` (host indices, per_row caches only): their
        encoder keys/values (per layer [n, Hkv, S', D], S' <= the encoder length held) go into the
        rows' encoder slots, the rest of those slots masked out; their own slots are all masked
        (the old request's keys stay, unread) and their positions start at zero. In place, so no
        shape and no buffer address changes (a compiled step, CUDA graphs included, replays as is)."""
        if not self.per_row:
            raise ValueError("refill needs a cache built with per_row=True")
        encoder = self.layers[0].keys.shape[2] - self.layers[0].size  # the encoder length held now
        width = cross_mask.shape[1]
        if width > encoder:
            raise ValueError(f"refilled rows need {width} encoder slots, the cache holds {encoder}")
        index = torch.tensor(list(rows), dtype=torch.long, device=self.position.device)
        pad = (0, 0, 0, encoder - width)  # [n, Hkv, S', D] -> [n, Hkv, encoder, D], zeros past S'
        for layer, kv in zip(self.layers, cross):
            keys, values = layer.keys[:, :, layer.size:], layer.values[:, :, layer.size:]
            if isinstance(kv, PackedCross):  # the rows' old keys zeroed, then the real tokens' written in place
                keys.index_fill_(0, index, 0)
                values.index_fill_(0, index, 0)
                kv.write(keys, values, rows=index)
            else:
                keys.index_copy_(0, index, torch.nn.functional.pad(kv[0], pad))
                values.index_copy_(0, index, torch.nn.functional.pad(kv[1], pad))
        dtype = self.layers[0].keys.dtype
        visible = torch.nn.functional.pad(cross_mask, (0, encoder - width), value=False)  # [n, encoder]
        enc = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))
        for kind, mask in self.masks.items():
            own = enc.new_full((len(rows), self.sizes[kind]), float("-inf"))
            mask.index_copy_(0, index, torch.cat((own, enc), 1)[:, None, None])
        self.position.index_fill_(0, index, 0)
        self.lengths.index_copy_(0, index, visible.sum(1))
        for row, w in zip(rows, widths):
            self.widths[row] = max(1, w)
        self._group()

    def follow_beams(self, rows: torch.Tensor) -> None:
        """Own slots of row i <- those of row rows[i] (beams duplicated or dropped).

        The encoder part is equal across the beams of a request, so it stays where it is.
        """
        for layer in self.layers:
            own = layer.size
            layer.keys[:, :, :own] = layer.keys[:, :, :own].index_select(0, rows)
            layer.values[:, :, :own] = layer.values[:, :, :own].index_select(0, rows)
