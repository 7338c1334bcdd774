"""Our T5Gemma2 against transformers' T5Gemma2ForConditionalGeneration (float32, CPU).

Each shape is a random checkpoint written with save_pretrained and read by our loader, so
the real key layout and config.json are exercised. Tolerance: max |diff| <= 1e-5 * max
|logit| (the issue asks for 1e-4; we hold ten times tighter).
"""

from __future__ import annotations

import pytest
import torch

import model
from helpers.checkpoints import SHAPES, SPECIAL, build_reference, save_checkpoint

TOLERANCE = 1e-5
MM = 4  # mm_tokens_per_image of the test checkpoints


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    ref = build_reference(SHAPES[request.param], seed=ord(request.param))
    directory = save_checkpoint(ref, tmp_path_factory.mktemp(f"ckpt{request.param}"))
    ours = model.load_pretrained(directory)
    return request.param, ref, ours


def text_batch(lengths, vocab=512, seed=0):
    """Right-padded random prompts of the given lengths (ids avoid the special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), SPECIAL["pad"])
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(10, vocab, (n,), generator=gen)
        mask[i, :n] = 1
    return ids, mask


def image_batch(lengths, images_per_row, seed=0):
    """Prompts with [boi, image x MM, eoi] spliced in after the first token, and pixel values."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n, k in zip(lengths, images_per_row):
        body = torch.randint(10, 512, (n,), generator=gen).tolist()
        block = [SPECIAL["boi"]] + [SPECIAL["image"]] * MM + [SPECIAL["eoi"]]
        rows.append(body[:1] + block * k + body[1:])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), SPECIAL["pad"])
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    pixels = torch.rand((sum(images_per_row), 3, 32, 32), generator=gen) * 2 - 1
    return ids, mask, pixels


def decoder_batch(batch, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dec = torch.randint(10, 512, (batch, steps), generator=gen)
    dec[:, 0] = SPECIAL["bos"]
    return dec


def assert_close(ours, ref, mask=None):
    if mask is not None:  # compare only real (non-padding) decoder rows
        ours, ref = ours[mask], ref[mask]
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= TOLERANCE * scale, f"max |diff| {diff:.3e} > {TOLERANCE} * max |logit| {scale:.3e}"


@torch.no_grad()
def test_teacher_forced_logits_text_padded(pair):
    _, ref, ours = pair
    # Inputs longer than every sliding window (3..5), unequal lengths, right padding.
    ids, mask = text_batch([17, 9, 4, 12])
    dec = decoder_batch(4, 11)
    expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_close(ours(ids, mask, dec), expected)


def _no_packed_sliding(monkeypatch):
    monkeypatch.setattr(model.t5gemma2.Packing, "_packed_is_cheaper", classmethod(lambda cls, *args: False))


@pytest.mark.parametrize("layout", ["packed", "groups"])
@torch.no_grad()
def test_long_inputs_attend_block_by_block_with_the_reference_logits(pair, monkeypatch, layout):
    """Sliding layers over inputs many windows long run as LocalAttention, over the packed row of all
    prompts or per padded group: the reference's logits either way."""
    _, ref, ours = pair
    monkeypatch.setattr(model.t5gemma2.Packing, "LOCAL_FROM", 2)  # windows are 3..5, inputs up to 40
    if layout == "groups":
        _no_packed_sliding(monkeypatch)
    ids, mask = text_batch([40, 23, 9, 31])
    packing = model.t5gemma2.Packing(mask.bool(), ours.config.encoder.sliding_window, torch.float32)
    if layout == "packed":  # the windows' keys per token cost less than these rows' padded groups
        assert packing.packed_sliding is not None
    else:
        assert any(isinstance(g[4]["sliding_attention"], model.layers.LocalAttention) for g in packing.groups)
    dec = decoder_batch(4, 7)
    expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_close(ours(ids, mask, dec), expected)


@pytest.mark.parametrize("group_area", [0, None], ids=["one-group-per-length", "default-groups"])
@torch.no_grad()
def test_encoder_attention_groups_give_the_reference_logits(pair, monkeypatch, group_area):
    """The encoder pads attention per group of similar-length rows; any grouping is the reference's math."""
    _, ref, ours = pair
    _no_packed_sliding(monkeypatch)  # sliding layers in the groups too (dense band masks)
    if group_area is not None:  # cut a group at every length change (the most groups)
        monkeypatch.setattr(model.t5gemma2.Packing, "GROUP_MIN_AREA", group_area)
        monkeypatch.setattr(model.t5gemma2.Packing, "GROUP_WASTE", 1.0)
    ids, mask = text_batch([2, 5, 5, 9, 40, 3, 31])  # unsorted on purpose: groups are consecutive rows
    groups = model.t5gemma2.Packing(mask.bool(), 4, torch.float32).groups
    assert len(groups) >= (5 if group_area == 0 else 1)
    dec = decoder_batch(7, 6)
    expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_close(ours(ids, mask, dec), expected)


@torch.no_grad()
def test_teacher_forced_logits_with_images(pair):
    _, ref, ours = pair
    ids, mask, pixels = image_batch([6, 13, 3], images_per_row=[1, 2, 1])
    dec = decoder_batch(3, 9)
    expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, pixel_values=pixels).logits
    got = ours(ids, mask, dec, pixel_values=pixels)
    assert_close(got, expected)
    # The image really matters: other pixels give other logits.
    assert (ours(ids, mask, dec, pixel_values=-pixels) - got).abs().max() > 1e-3


@torch.no_grad()
def test_end_of_image_token_uses_its_own_embedding(pair):
    _, _, ours = pair
    ids = torch.tensor([[SPECIAL["eoi"], 11]])
    emb = ours.embed_tokens(ids)
    assert torch.equal(emb[0, 0], ours.embed_tokens.eoi_embedding)
    assert not torch.allclose(emb[0, 0], ours.embed_tokens.weight[SPECIAL["eoi"]] * 64 ** 0.5)


def greedy_by_teacher_forcing(ours, ids, mask, steps, pixels=None):
    """Greedy decoding with no cache at all: re-run the full forward for every new token."""
    dec = torch.full((ids.shape[0], 1), SPECIAL["bos"])
    for _ in range(steps):
        nxt = ours(ids, mask, dec, pixel_values=pixels)[:, -1].argmax(-1, keepdim=True)
        dec = torch.cat([dec, nxt], dim=1)
    return dec[:, 1:]


def trim(tokens, eos=SPECIAL["eos"]):
    out = []
    for t in tokens:
        out.append(t)
        if t == eos:
            break
    return out


@pytest.mark.parametrize("with_images", [False, True])
@torch.no_grad()
def test_greedy_continuation_matches_generate(pair, with_images):
    _, ref, ours = pair
    if with_images:
        ids, mask, pixels = image_batch([5, 11], images_per_row=[1, 1], seed=3)
    else:
        ids, mask = text_batch([14, 6, 9], seed=3)
        pixels = None
    ours_tokens = greedy_by_teacher_forcing(ours, ids, mask, 32, pixels)
    kwargs = dict(pixel_values=pixels) if pixels is not None else {}
    expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                            num_beams=1, **kwargs)[:, 1:]  # drop the decoder start token
    for row in range(ids.shape[0]):
        want = trim(expected[row].tolist())
        got = trim(ours_tokens[row].tolist())
        assert got == want, f"row {row}: ours {got} != reference {want}"
    assert sum(len(trim(r.tolist())) for r in ours_tokens) >= 16  # really generated something


def test_config_fields_parsed(pair):
    name, ref, ours = pair
    cfg = ours.config
    hf = ref.config
    assert cfg.decoder.layer_types == tuple(hf.decoder.layer_types)
    assert cfg.encoder.sliding_window == hf.encoder.text_config.sliding_window
    assert cfg.decoder.num_kv_heads == hf.decoder.num_key_value_heads
    assert cfg.mm_tokens_per_image == MM
    assert cfg.eos_token_ids == (SPECIAL["eos"],)
    ids = (cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id)
    assert ids == (SPECIAL["boi"], SPECIAL["eoi"], SPECIAL["image"])
    if name == "B":
        assert cfg.decoder.final_logit_softcapping == 3.0
        assert cfg.decoder.rope["full_attention"].scaling == "linear"
        assert cfg.decoder.rope["full_attention"].factor == 8.0
