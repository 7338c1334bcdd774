"""The encoder's memory grows linearly with the prompt length S (docs/perf.md, "Long documents"): for a long
prompt no attention mask it builds is [S, S]: full-attention layers give the fused SDPA kernel a [B, 1, 1, S]
key mask (the kernel keeps the [S, S] scores out of memory), sliding layers attend in LocalAttention blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import model
from jobs.bench import shape_config


def test_a_long_prompt_gets_no_square_mask(monkeypatch):
    cfg = shape_config("small")  # sliding window 64, full attention in layer 6
    m = model.random_model(cfg, seed=0)
    steps = 2048
    masks = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        masks.append(tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    ids = torch.randint(10, cfg.vocab_size - 10, (1, steps), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        memory = m.encode(ids, torch.ones_like(ids, dtype=torch.bool))
    assert memory.shape == (1, steps, cfg.encoder.hidden_size) and torch.isfinite(memory).all()
    assert len(masks) == cfg.encoder.num_layers and (1, 1, 1, steps) in masks  # the full layer's key mask
    window = cfg.encoder.sliding_window
    for shape in masks:
        assert shape[-2] < steps or shape[-1] < steps, shape
        assert torch.Size(shape).numel() <= 2 * window * steps, shape  # linear in S
