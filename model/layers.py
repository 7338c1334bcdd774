"""Building blocks of the T5Gemma 2 text stacks: RMSNorm, rotary embedding, GeGLU MLP, attention.

Written for inference speed at small batch widths, where each decode step is dominated by the
number of kernels launched, not their size:
- projections that read the same input are one matmul (`FusedLinear`: q|k|v, gate|up); the
  checkpoint keeps them apart and weights.py splits or joins them by `FusedLinear.parts`;
- q and k heads are normed and rotated together, in the [B, T, heads, D] layout the
  projection produces (no transposes before attention);
- derived constants (the (1 + w) norm scales, the per-head q|k scale) are built once and
  reused while their weights are unchanged (`_derived`), not recomputed at every call.
The math is Gemma 3's, op for op where it matters for rounding (RMSNorm in float32 as the
reference writes it). Intermediates this code just made are updated in place (`mul_`,
`addcmul_`): on CPU every fresh large tensor costs page faults, not only arithmetic.

Not here: how layers are stacked (t5gemma2.py), caches and the per-step attention layout
(cache.py), SigLIP (siglip.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import RopeConfig, TextConfig


def _derived(owner: nn.Module, name: str, sources: tuple[torch.Tensor, ...], build: Callable[[], torch.Tensor]):
    """`build()` from `sources`, cached on `owner` while no source changes (inference only).

    The cache key is each source's storage, version counter (bumped by in-place writes such as
    load_state_dict), dtype and device, so a reload or `.to()` rebuilds it. With autograd on, the
    value is rebuilt every call so gradients still reach the weights.
    """
    if torch.is_grad_enabled():
        return build()
    if torch.compiler.is_compiling():
        # Traced (the compiled decode step): no storage checks in a graph. The value built by the
        # eager calls before is used as a constant; a graph traced first builds it in the graph.
        hit = owner.__dict__.get(name)
        return hit[1] if hit is not None else build()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    hit = owner.__dict__.get(name)
    if hit is None or hit[0] != key:
        # A plain tensor even under inference_mode, so a later grad-free call outside it may use it.
        with torch.inference_mode(False), torch.no_grad():
            hit = (key, build())
        owner.__dict__[name] = hit
    return hit[1]


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, in float32 (as Gemma computes it)."""
    if x.dtype != torch.float32:  # (a no-op .float() still costs a dispatch per call)
        x = x.float()
    return x * x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()


class RMSNorm(nn.Module):
    """Gemma RMSNorm: normalised in float32, scaled by (1 + weight), cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def scale(self) -> torch.Tensor:
        """(1 + weight) in float32, [dim]."""
        return _derived(self, "_scale", (self.weight,), lambda: 1.0 + self.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast down once at the end (as Gemma does), so bf16 rounding happens once.
        return _cast(rms_normalize(x, self.eps).mul_(self.scale()), x.dtype)


class FusedLinear(nn.Module):
    """Projections of one input computed as one matmul: weight rows (and bias entries) are the parts, in order.

    `parts` maps each projection's checkpoint name (a sibling of this module, e.g. "q_proj") to
    its output width; the loader fills the rows from those tensors and the writer splits them.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool = False):
        super().__init__()
        self.parts = dict(parts)
        self.weight = nn.Parameter(torch.empty(sum(parts.values()), in_features))
        self.bias = nn.Parameter(torch.empty(sum(parts.values()))) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class GeGLU(nn.Module):
    """Gated MLP: down(gelu_tanh(gate(x)) * up(x)), gate and up as one matmul."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden, {"gate_proj": inner, "up_proj": inner})
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh").mul_(up))


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
        """positions [..., T] (int) -> cos, signed sin [..., T, 1, D] in `dtype` (the 1 broadcasts over heads).

        The sin table carries the rotation's sign, (-sin, +sin) over the two halves, so applying it
        needs no negation per call (see apply_rotary).
        """
        freqs = positions.float()[..., None] * self.inv_freq.float()  # [..., T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((-sin, sin), dim=-1)
        return cos.to(dtype)[..., None, :], sin.to(dtype)[..., None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, D] rotated by the angles in cos / signed_sin (halves layout).

    Gemma's x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1): rolling x by half
    gives (x2, x1), and the sign sits in signed_sin.
    """
    return (x * cos).addcmul_(x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention under a mask.

    q [B, Hq, T, D]; k, v [B, Hkv, S, D]; mask [B, T, S] (bool, True = may attend) or an
    additive float mask broadcastable to [B, Hq, T, S] -> [B, Hq, T, D].
    PyTorch's fused attention kernels keep the [T, S] scores out of memory for long inputs.
    """
    if mask.dtype == torch.bool and mask.dim() == 3:
        mask = mask[:, None]
    if q.device.type == "cpu" and k.shape[2] <= SMALL_ATTENTION_KEYS:
        return _small_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


# On CPU, SDPA's fused kernel costs a few microseconds per (row, head) problem whatever its size, so
# for many small problems (the encoder's sliding windows of a small model: blocks of a window's
# queries against 2 x window - 1 keys) two batched matmuls and a softmax are faster: measured on a
# 2-core EPYC, 142 blocks x 4 heads x 16 queries x 31 keys: 1.6 ms with SDPA, 0.74 ms here; at 64
# keys 0.33 against 0.23 ms; from 128 keys on SDPA wins (the scores no longer stay in cache).
SMALL_ATTENTION_KEYS = 64


def _small_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """attention() for few keys, as explicit scores: the query heads of a kv head go as the rows of one
    matmul, so a kv head's keys are read once. Same shapes and mask rules as attention()."""
    batch, heads, steps, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if mask.dtype == torch.bool:
        mask = _additive(mask, q.dtype)
    scores = torch.bmm(q.reshape(batch * kv_heads, group * steps, dim),
                       k.reshape(batch * kv_heads, keys, dim).transpose(1, 2))  # [B * Hkv, G * T, S]
    # The softmax in float32, as SDPA's kernels compute it for bfloat16 inputs.
    scores = scores.view(batch, heads, steps, keys).float().mul_(scale).add_(mask).softmax(-1).to(q.dtype)
    out = torch.bmm(scores.view(batch * kv_heads, group * steps, keys), v.reshape(batch * kv_heads, keys, dim))
    return out.view(batch, heads, steps, dim)


# cuDNN's attention, PyTorch's first choice on Hopper, failed on an H200 (torch 2.11) under the decode
# masks: "mha_graph.execute(...).is_good()", then "misaligned address" for the rest of the process. A
# decode mask's rows are slices of the cache's [own slots ; encoder] width, whose stride need not be
# aligned. The memory-efficient kernel, next in line for a float mask, pads such masks itself.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
    """A decode step's SDPA under its additive mask, without the cuDNN kernel. q [B, Hkv, G, D];
    keys, values [B, Hkv, L, D]; mask [B, 1, 1, L] -> [B, Hkv, G, D]."""
    with sdpa_kernel(DECODE_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


# A decode step's attention in length groups, as one operator that torch.compile does not trace: the
# groups (which rows read how many keys) are data in a small CPU tensor, so a compiled CPU step reads only
# what eager steps read (a group's keys up to its longest row) while refill and compaction change the
# groups without a new graph. Traced instead, the groups would be constants of the graph, so every regroup
# would recompile (measured: the limit was hit after a few runs), and one SDPA over every row's padded
# width is what compiled CPU steps did before: on the 600-row longtail run 0.43 s of 1.0 s went to it.
# CPU only: on a GPU the groups' read-back would sync, and FlexAttention skips the padding instead.
@torch.library.custom_op("t5g2::grouped_decode_attention", mutates_args=())
def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                             groups: torch.Tensor, own: int, scale: float) -> torch.Tensor:
    """q [B, Hkv, G, D]; keys, values [B, Hkv, own + S, D]; mask [B, 1, 1, own + S] (additive);
    groups [N, 3] long on the CPU: (first row, end row, encoder width read), rows with first == end unused
    -> [B, Hkv, G, D], each group attending to its own slots and its first `width` encoder keys."""
    parts = [F.scaled_dot_product_attention(q[a:b], keys[a:b, :, : own + w], values[a:b, :, : own + w],
                                            attn_mask=mask[a:b, ..., : own + w], scale=scale)
             for a, b, w in groups.tolist() if b > a]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@grouped_decode_attention.register_fake
def _(q, keys, values, mask, groups, own, scale):
    return torch.empty_like(q)


# Key block of the decode FlexAttention: a block no row reads is skipped, so a row reads at most one
# block of padding past its own keys (FlexAttention's default size; its decode kernel splits the keys).
DECODE_KEY_BLOCK = 128


def decode_attention_flex(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, own: int,
                          position: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode step's merged attention that reads only real keys, with no additive mask.

    q [B, Hkv, G, D] (the G query heads of a kv head as its query rows); keys, values [B, Hkv, own + S, D]:
    `own` slots of the layer's own keys, then the encoder's; position [B] or [1] (the step each row
    decodes: own slots up to it are written, a ring's once it is full); lengths [B]: each row's
    encoder length (its real keys are a prefix of the encoder part) -> [B, Hkv, G, D].

    Why FlexAttention, in one call: its block mask skips every key block past a row's own keys +
    encoder length, and its mask_mod states both halves of the merged softmax exactly, so rows of
    very different lengths share one call without reading each other's padding (where SDPA reads
    the widest row's keys for all, through a float mask that keeps it off its flash kernels).
    One call rather than two (self, cross) joined by their log-sum-exp: torch 2.13 cannot return
    the log-sum-exp on CPU, where the tests run. Used by the compiled step (FlexAttention needs
    torch.compile for speed; eager it runs a reference implementation that reads every key), SDPA in
    eager mode.
    """
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = decode_block_mask(q.shape[0], q.shape[2], keys.shape[2], own, position, lengths)
    return flex_attention(q, keys, values, block_mask=block_mask, scale=scale)


def decode_block_mask(batch: int, queries: int, total: int, own: int, position: torch.Tensor,
                      lengths: torch.Tensor):
    """The BlockMask of decode_attention_flex: per row, the key blocks holding its keys (a prefix of the
    buffer: own slots, then its encoder keys) and, within them, the exact rule as a mask_mod. Built
    from device tensors only (no read back), inside the compiled step."""
    from torch.nn.attention.flex_attention import BlockMask

    lockstep = position.shape[0] == 1  # beam search: one position for every row

    # The captured tensors are indexed as given (a view of them would not lower on CPU).
    def visible(b, h, q_idx, kv_idx):
        step = position[0] if lockstep else position[b]
        return ((kv_idx < own) & (kv_idx <= step)) | ((kv_idx >= own) & (kv_idx - own < lengths[b]))

    blocks = -(-total // DECODE_KEY_BLOCK)
    read = (own + lengths + DECODE_KEY_BLOCK - 1).div(DECODE_KEY_BLOCK, rounding_mode="floor")  # [B] blocks
    indices = torch.arange(blocks, dtype=torch.int32, device=lengths.device).expand(batch, 1, 1, blocks)
    return BlockMask.from_kv_blocks(read.to(torch.int32).view(batch, 1, 1), indices.contiguous(),
                                    BLOCK_SIZE=(DECODE_KEY_BLOCK, DECODE_KEY_BLOCK), mask_mod=visible,
                                    seq_lengths=(queries, total))


def padded_widths(mask: torch.Tensor) -> list[int]:
    """Per row of a [B, S] bool mask, the width it needs: its last True position + 1 (0 if none)."""
    return (torch.arange(1, mask.shape[1] + 1, device=mask.device) * mask).amax(1).tolist()


def length_groups(widths: list[int], row_cost: Callable[[int], int], waste: float,
                  min_cost: int) -> list[tuple[int, int, int]]:
    """Cut consecutive rows into groups padded to their own widest row: [(first row, end row, width)].

    `widths[i]` is the padded width row i needs and `row_cost(w)` what one row costs at width w
    (w * w for self-attention over w tokens, own slots + w for a decode step). A group grows
    while its padded cost, rows x row_cost(widest), stays within `waste` x what its rows need,
    or below `min_cost` (a call on a small group costs more in overhead than padding does).
    Rows sorted by width make tight groups; any order is still correct, only padded more.
    """
    groups = []
    first, width, needed = 0, 0, 0
    for row, w in enumerate(widths):
        grown = max(width, w)
        cost = (row + 1 - first) * row_cost(grown)
        if row > first and cost > min_cost and cost > waste * (needed + row_cost(w)):
            groups.append((first, row, width))
            first, grown, needed = row, w, 0
        width, needed = grown, needed + row_cost(w)
    if widths:
        groups.append((first, len(widths), width))
    return groups


@dataclass(frozen=True)
class PackedCross:
    """One decoder layer's encoder keys and values of the real tokens only, with where each belongs.

    Written straight into a decode cache's buffers: a padded [B, Hkv, S, D] copy first would be one more
    large allocation per layer (on CPU, page faults on first touch) and one more copy of the keys.
    """

    keys: torch.Tensor  # [N, Hkv, D], normed
    values: torch.Tensor  # [N, Hkv, D]
    rows: torch.Tensor  # [N] long: the prompt (batch row) of each token
    positions: torch.Tensor  # [N] long: its position in that prompt

    def write(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Into keys, values [B', Hkv, S', D] (views allowed) at each token's (row, position); rows [P]:
        the buffers' row of each prompt, when it is not the prompt's own index. Other positions untouched."""
        at = self.rows if rows is None else rows[self.rows]
        keys[at, :, self.positions] = self.keys
        values[at, :, self.positions] = self.values


class AttentionProjections(nn.Module):
    """q|k|v and o projections with per-head q/k RMSNorm, shared by encoder and decoder blocks."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.scaling
        self.eps = cfg.rms_norm_eps
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = FusedLinear(cfg.hidden_size, {"q_proj": q_width, "k_proj": kv_width, "v_proj": kv_width})
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def _qk_scale(self) -> torch.Tensor:
        """[Hq + Hkv, D]: q_norm's scale on the q heads, k_norm's on the k heads."""
        return _derived(self, "_qk", (self.q_norm.weight, self.k_norm.weight), lambda: torch.cat((
            self.q_norm.scale().expand(self.num_heads, -1), self.k_norm.scale().expand(self.num_kv_heads, -1))))

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> qk [B, T, Hq + Hkv, D] (q heads then k heads, normed and rotated), v [B, T, Hkv, D]."""
        batch, steps, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, steps, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        split = self.num_heads + self.num_kv_heads
        qk = _cast(rms_normalize(qkv[:, :, :split], self.eps).mul_(self._qk_scale()), x.dtype)
        return apply_rotary(qk, cos, sin), qkv[:, :, split:]

    def cross_kv(self, memory: torch.Tensor, real: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output [B, S, H] -> k, v [B, Hkv, S, D]: k normed, not rotated (encoder keys have no
        position here). real: (the real tokens of memory [N, H], their rows [N] and positions [N]) to
        project only those; padding positions then get zeros, as zero memory rows would give."""
        batch, steps, _ = memory.shape
        if real is None:
            weight = self.qkv_proj.weight[self.num_heads * self.head_dim :]
            kv = F.linear(memory, weight).view(batch, steps, 2 * self.num_kv_heads, self.head_dim)
            k = self.k_norm(kv[:, :, : self.num_kv_heads])
            return k.transpose(1, 2), kv[:, :, self.num_kv_heads :].transpose(1, 2)
        packed = self.cross_kv_packed(*real)
        k = memory.new_zeros(batch, self.num_kv_heads, steps, self.head_dim)
        v = torch.zeros_like(k)
        packed.write(k, v)
        return k, v

    def cross_kv_packed(self, tokens: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> PackedCross:
        """The real encoder tokens [N, H] (of prompts `rows` [N], at `positions` [N]) -> their k, v."""
        weight = self.qkv_proj.weight[self.num_heads * self.head_dim :]
        kv = F.linear(tokens, weight).view(-1, 2 * self.num_kv_heads, self.head_dim)  # [N, 2 Hkv, D]
        return PackedCross(self.k_norm(kv[:, : self.num_kv_heads]), kv[:, self.num_kv_heads :], rows, positions)

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, Hq, T, D] -> [B, T, H]."""
        batch, _, steps, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(batch, steps, -1))


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = may attend) -> additive mask (0 / -inf) in `dtype`: SDPA takes it as is."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def encoder_window(window: int) -> tuple[int, int]:
    """Keys (left, right) of the query that an encoder sliding layer sees, as the reference splits
    the window: (w+1)//2 keys to the left including the query itself, w//2 to the right."""
    return (window + 1) // 2 - 1, window // 2


def key_padding_mask(padding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Encoder full-attention mask from a padding mask [B, S] (True = token): additive [B, 1, 1, S],
    keys only, broadcast over queries (no [S, S] mask at all)."""
    return _additive(padding[:, None, None, :], dtype)


def window_band_mask(padding: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """Encoder sliding-window mask, dense: additive [B, 1, S, S], the window band over real keys.

    The diagonal is always allowed so that padding queries never see an empty row (their outputs
    are unused, but must stay finite). Inputs much longer than the window use LocalAttention.
    """
    left, right = encoder_window(window)
    idx = torch.arange(padding.shape[1], device=padding.device)
    offset = idx[None, :] - idx[:, None]  # key - query, [S, S]
    band = ((offset >= -left) & (offset <= right) & padding[:, None, :]) | (offset == 0)
    return _additive(band[:, None], dtype)


class LocalAttention:
    """Encoder sliding-window attention by blocks of queries, for inputs much longer than the window.

    The dense band mask and the scores it guards grow with S^2 (a 32K-token input would need a
    4 GiB mask per row); here queries go in blocks of `window`, each block attending to the keys
    its window can reach (block + window - 1 of them), so memory and work grow with S x window.
    Same keys, same softmax as the dense band: only keys every query of a block must skip are
    masked, block by block.

    With `segments` (the row each token belongs to), one "row" may hold many prompts back to back:
    the encoder's packed tokens, with no padding between them. A key then also needs the query's
    segment; a prompt's tokens are consecutive and in order, so distances within a segment are
    distances within its prompt, and the window rule is unchanged.
    """

    def __init__(self, padding: torch.Tensor, window: int, dtype: torch.dtype, segments: torch.Tensor | None = None):
        """padding [B, S] (True = token); segments [B, S] (int, optional): a query sees only keys of its segment."""
        rows, steps = padding.shape
        self.left, self.right = encoder_window(window)
        self.block = max(1, window)
        self.blocks = -(-steps // self.block)
        self.steps = steps
        self.keys = self.block + self.left + self.right  # keys a block of queries can reach
        tail = self.blocks * self.block - steps
        valid = F.pad(padding, (self.left, tail + self.right), value=False).unfold(1, self.keys, self.block)
        query = torch.arange(self.block, device=padding.device)[:, None]  # offset in the block
        key = torch.arange(self.keys, device=padding.device)[None, :]  # offset in the block's keys
        band = (key >= query) & (key <= query + self.left + self.right)  # [block, keys]
        allowed = band & valid[:, :, None, :]  # [B, n, block, keys]
        if segments is not None:
            key_segment = F.pad(segments, (self.left, tail + self.right), value=-1).unfold(1, self.keys, self.block)
            query_segment = F.pad(segments, (0, tail), value=-2).view(rows, self.blocks, self.block)
            allowed &= query_segment[..., None] == key_segment[:, :, None, :]
        allowed |= key == query + self.left  # own key: rows stay finite
        self.mask = _additive(allowed, dtype).view(rows * self.blocks, 1, self.block, self.keys)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, S, D] keys or values -> [B * blocks, h, keys, D], each block's reachable keys."""
        rows, heads, _, dim = x.shape
        tail = self.blocks * self.block - self.steps
        windows = F.pad(x, (0, 0, self.left, tail + self.right)).unfold(2, self.keys, self.block)  # [B, h, n, D, K]
        return windows.permute(0, 2, 1, 4, 3).reshape(rows * self.blocks, heads, self.keys, dim)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, Hq, S, D]; k, v [B, Hkv, S, D] -> [B, Hq, S, D]."""
        rows, heads, _, dim = q.shape
        tail = self.blocks * self.block - self.steps
        q = F.pad(q, (0, 0, 0, tail)).view(rows, heads, self.blocks, self.block, dim).transpose(1, 2)
        out = attention(q.reshape(rows * self.blocks, heads, self.block, dim), self._windows(k), self._windows(v),
                        self.mask, scale)  # [B * n, Hq, block, D]
        out = out.view(rows, self.blocks, heads, self.block, dim).transpose(1, 2)
        return out.reshape(rows, heads, self.blocks * self.block, dim)[:, :, : self.steps]


def decoder_self_masks(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """Causal masks [B, T, S] per layer type from query positions [B, T] and key positions [B, S].

    Sliding layers see the last `window` positions including the query's own.
    """
    dist = query_pos[:, :, None] - key_pos[:, None, :]  # [B, T, S]
    causal = dist >= 0
    return {"full_attention": causal, "sliding_attention": causal & (dist < window)}
