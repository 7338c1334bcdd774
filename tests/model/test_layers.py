"""Layer-level promises the parity tests do not pin down on their own."""

from __future__ import annotations

import torch

from model.config import RopeConfig
from model.layers import RMSNorm, Rotary, apply_rotary


def test_norm_scale_cache_follows_weight_changes():
    norm = RMSNorm(8, 1e-6)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        before = norm(x)  # caches (1 + w)
    with torch.no_grad():
        norm.weight.add_(0.5)  # in place, as load_state_dict writes
    with torch.inference_mode():
        after = norm(x)
    assert torch.allclose(after, before * 1.5, atol=1e-6)
    norm.weight = torch.nn.Parameter(torch.full((8,), -0.25))  # replaced, as assign=True loading does
    with torch.inference_mode():
        assert torch.allclose(norm(x), before * 0.75, atol=1e-6)
    # With autograd on, gradients still reach the weight.
    norm(x).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_rotary_equals_the_rotate_half_formula():
    rot = Rotary(16, RopeConfig(10_000.0))
    x = torch.randn(2, 5, 3, 16)  # [B, T, heads, D]
    positions = torch.arange(5).expand(2, 5)
    cos, signed_sin = rot.cos_sin(positions, torch.float32)
    freqs = positions.float()[..., None] * rot.inv_freq
    angles = torch.cat((freqs, freqs), -1)[:, :, None]  # [B, T, 1, D]
    rotate_half = torch.cat((-x[..., 8:], x[..., :8]), -1)
    expected = x * angles.cos() + rotate_half * angles.sin()
    assert torch.allclose(apply_rotary(x, cos, signed_sin), expected, atol=1e-6)


def test_local_attention_equals_the_dense_window_band():
    """Block-by-block sliding attention gives what the dense [S, S] band mask gives, padding included."""
    from model.layers import LocalAttention, attention, window_band_mask

    gen = torch.Generator().manual_seed(0)
    for window, lengths, heads, kv_heads in [(4, [37, 20, 1], 4, 2), (5, [16, 9], 2, 2), (1, [7, 3], 2, 1),
                                             (8, [8, 64], 4, 1)]:
        steps = max(lengths)
        padding = torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]
        q = torch.randn(len(lengths), heads, steps, 16, generator=gen)
        k = torch.randn(len(lengths), kv_heads, steps, 16, generator=gen)
        v = torch.randn(len(lengths), kv_heads, steps, 16, generator=gen)
        dense = attention(q, k, v, window_band_mask(padding, window, torch.float32), 0.25)
        local = LocalAttention(padding, window, torch.float32)(q, k, v, 0.25)
        real = padding[:, None, :, None].expand_as(dense)  # padding queries' outputs are never used
        assert torch.allclose(local[real], dense[real], atol=1e-5), (window, lengths)
        assert torch.isfinite(local).all()


def test_packed_local_attention_equals_each_prompt_alone():
    """LocalAttention over prompts packed back to back, with segments, gives each prompt's own dense band."""
    from model.layers import LocalAttention, attention, window_band_mask

    gen = torch.Generator().manual_seed(1)
    for window, lengths in [(4, [9, 1, 13, 4]), (5, [2, 30]), (1, [3, 3]), (16, [40, 7, 16])]:
        heads, kv_heads, dim = 4, 1, 8
        total = sum(lengths)
        q = torch.randn(1, heads, total, dim, generator=gen)
        k = torch.randn(1, kv_heads, total, dim, generator=gen)
        v = torch.randn(1, kv_heads, total, dim, generator=gen)
        segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        packed = LocalAttention(torch.ones(1, total, dtype=torch.bool), window, torch.float32, segments)(q, k, v, 0.5)
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            alone = attention(q[:, :, part], k[:, :, part], v[:, :, part],
                              window_band_mask(torch.ones(1, n, dtype=torch.bool), window, torch.float32), 0.5)
            assert torch.allclose(packed[:, :, part], alone, atol=1e-5), (window, lengths, n)
            start += n


def test_small_attention_equals_sdpa():
    """The explicit-scores path for few keys (CPU) is SDPA's math: GQA, bool and float masks."""
    import torch.nn.functional as F

    from model.layers import SMALL_ATTENTION_KEYS, _small_attention

    gen = torch.Generator().manual_seed(2)
    for heads, kv_heads, steps, keys in [(4, 1, 16, 31), (4, 2, 5, SMALL_ATTENTION_KEYS), (2, 2, 1, 7)]:
        q = torch.randn(3, heads, steps, 8, generator=gen)
        k = torch.randn(3, kv_heads, keys, 8, generator=gen)
        v = torch.randn(3, kv_heads, keys, 8, generator=gen)
        allowed = torch.rand(3, 1, steps, keys, generator=gen) > 0.4
        allowed[..., 0] = True
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=True)
        assert torch.allclose(_small_attention(q, k, v, allowed, 0.3), expected, atol=1e-6)
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        assert torch.allclose(_small_attention(q, k, v, additive, 0.3), expected, atol=1e-6)
        # bfloat16: no further from the float32 result than SDPA's own bfloat16 kernel (softmax in float32)
        low = [t.bfloat16() for t in (q, k, v)]
        ours = (_small_attention(*low, allowed, 0.3).float() - expected).abs().max()
        sdpa = (F.scaled_dot_product_attention(*low, attn_mask=allowed, scale=0.3, enable_gqa=True).float()
                - expected).abs().max()
        assert ours <= 1.5 * sdpa + 1e-3, (ours, sdpa)


def test_cross_keys_from_the_real_tokens_only_equal_the_padded_projection():
    """cross_kv with the padding mask (CPU: projects only real tokens) gives the padded batch's keys/values."""
    import model
    from jobs.bench import shape_config

    m = model.random_model(shape_config("tiny"), seed=3)
    lengths = torch.tensor([5, 1, 9])
    padding = torch.arange(9)[None, :] < lengths[:, None]
    ids = torch.randint(10, 900, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        memory = m.encode(ids, padding)
        for (k, v), (k_real, v_real) in zip(m.cross_kv(memory), m.cross_kv(memory, padding), strict=True):
            assert torch.allclose(k, k_real, atol=1e-6) and torch.allclose(v, v_real, atol=1e-6)
            assert not k_real[~padding[:, None, :, None].expand_as(k_real)].any()  # zeros at padding
