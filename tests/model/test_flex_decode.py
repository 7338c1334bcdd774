"""The decode step's FlexAttention (layers.decode_attention_flex): equal to SDPA under the additive mask
the cache keeps, for rows at their own positions (ring slots of sliding layers included) and encoder
lengths; key blocks past a row's real keys are never read; and generation with it (eager, and the
real inductor compile on CPU) gives the tokens SDPA gives, refill and beams included.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import model
from helpers.checkpoints import random_prompts, tiny_pair
from model.layers import DECODE_KEY_BLOCK, decode_attention_flex, decode_block_mask


def masked_sdpa(q, keys, values, own, position, lengths, scale):
    """The cache's rule as an additive mask: own slots written so far (a full ring: all), encoder prefix."""
    batch, total = q.shape[0], keys.shape[2]
    kv = torch.arange(total)[None]
    steps = position.expand(batch)[:, None]
    visible = ((kv < own) & (kv <= steps)) | ((kv >= own) & (kv - own < lengths[:, None]))
    mask = torch.zeros(batch, 1, 1, total).masked_fill(~visible[:, None, None], float("-inf"))
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("own, positions", [(16, [0, 3, 15, 16, 40, 2]), (40, [0, 39, 7, 12, 25, 1])],
                         ids=["ring", "full"])
@pytest.mark.parametrize("kv_heads, groups", [(1, 4), (2, 2)])
def test_flex_equals_sdpa_under_the_mask(own, positions, kv_heads, groups):
    gen = torch.Generator().manual_seed(own + kv_heads)
    encoder = 300  # three key blocks with the own slots
    lengths = torch.tensor([0, 1, 127, 300, 90, 200])
    q = torch.randn(6, kv_heads, groups, 32, generator=gen)
    keys = torch.randn(6, kv_heads, own + encoder, 32, generator=gen)
    values = torch.randn(6, kv_heads, own + encoder, 32, generator=gen)
    for position in (torch.tensor(positions), torch.tensor([positions[2]])):  # per row, and lockstep
        with torch.inference_mode():
            got = decode_attention_flex(q, keys, values, own, position, lengths, 0.2)
            want = masked_sdpa(q, keys, values, own, position, lengths, 0.2)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_block_mask_skips_blocks_past_a_rows_keys():
    """Each row reads the key blocks up to its own slots + encoder length, none past them (the compiled
    kernel skips the rest; the eager reference implementation reads every key regardless)."""
    own, encoder = 8, 3 * DECODE_KEY_BLOCK
    lengths = torch.tensor([5, DECODE_KEY_BLOCK, 2 * DECODE_KEY_BLOCK + 1, 0])
    mask = decode_block_mask(4, 4, own + encoder, own, torch.tensor([3, 7, 0, 1]), lengths)
    assert mask.kv_num_blocks.view(-1).tolist() == [1, 2, 3, 1]
    assert mask.kv_indices[:, 0, 0, :3].tolist() == [[0, 1, 2]] * 4  # a prefix of the buffer
    dense = mask.to_dense()[:, 0, 0]  # [B, key blocks]: 1 = read
    assert dense.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("tiny"))[1]


def mixed(ids):
    """Greedy rows that end at different steps, a sampled row and a beam request."""
    params = [model.GenerationParams(max_new_tokens=3 + 2 * i) for i in range(len(ids) - 2)]
    params += [model.GenerationParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=5),
               model.GenerationParams(max_new_tokens=5, num_beams=2)]
    return [model.Request(p, params=q) for p, q in zip(ids, params)]


def outcome(results):
    return [(r.token_ids, r.finish_reason) for r in results]


def test_generation_with_flex_equals_sdpa(tiny):
    """Eager FlexAttention (its reference implementation) through refill: 2 slots for 5 requests."""
    reqs = mixed(random_prompts([4, 19, 7, 12, 9, 6], seed=8))
    flex = model.Generator(tiny, max_batch_size=2, attention="flex")
    assert outcome(flex.generate(reqs)) == outcome(model.Generator(tiny, max_batch_size=2).generate(reqs))
    assert flex.stats.micro_batches >= 3, "no refill happened"
    with pytest.raises(ValueError, match="attention must be"):
        model.Generator(tiny, attention="dense")


def test_inductor_step_with_flex_equals_eager(tiny):
    """The real compile (inductor on CPU) of the step with FlexAttention: the tokens eager SDPA gives,
    through refills (2 slots, 4 requests: new encoder lengths in the same graph), then a second shape
    (4 slots, a wider encoder bucket), which is where dynamo used to make dims dynamic and the CPU
    kernel failed to build. Rows never leave to a smaller bucket within a run (compact_fraction 1);
    beams are left to the eager test above."""
    torch._dynamo.reset()
    reqs = mixed(random_prompts([5, 30, 11, 8, 14, 3], seed=9))[:4]
    wide = [model.Request(p, params=model.GenerationParams(max_new_tokens=4))
            for p in random_prompts([70, 9, 20, 33], seed=3)]
    gen = model.Generator(tiny, compile=True, attention="flex", max_batch_size=2, compact_fraction=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would hide what this test is for
        got = gen.generate(reqs)
        wider = model.Generator(tiny, compile=True, attention="flex", max_batch_size=4, compact_fraction=1.0)
        got_wide = wider.generate(wide)
    assert gen.compile_fallback is None and wider.compile_fallback is None and gen.stats.micro_batches >= 3
    eager = model.Generator(tiny)
    assert outcome(got) == outcome(eager.generate(reqs))
    assert outcome(got_wide) == outcome(eager.generate(wide))
