"""bfloat16 on CPU: our logits are no further from the float32 reference than transformers' own
bfloat16 logits are (mean and 99th percentile |diff|), and bfloat16 generation (eager and compiled) gives valid results.

On random weights bfloat16 greedy tokens diverge from float32 within transformers itself on
most rows, so token equality is not the measure here; the distance of the logits is.
"""

from __future__ import annotations

import copy

import pytest
import torch

import model
from helpers.checkpoints import SHAPES, SPECIAL, build_reference, save_checkpoint

MM = 4
# Ours may be this much further from float32 than transformers' bfloat16 is: the issue's 1.5 on the
# mean and the 99th percentile of |diff|; on the max |diff|, a single-element statistic, 3. Measured
# (shapes x text/images x 3 seeds): mean 0.87-1.14, p99 0.86-1.29 on every case; the max ran 0.64-1.65
# except one case, shape A's text batch, at 1.85 on an Intel Xeon and 2.04 on an AMD EPYC: per-position
# ratios there run 0.46-2.16 either way, two independent roundings of similar size (docs/perf.md).
RATIO = {"mean": 1.5, "p99": 1.5, "amax": 3.0}


def p99(x: torch.Tensor) -> torch.Tensor:
    return torch.quantile(x.flatten().float(), 0.99)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def trio(request, tmp_path_factory):
    """(transformers float32, transformers bfloat16, ours bfloat16) from one random checkpoint."""
    ref = build_reference(SHAPES[request.param], seed=200 + ord(request.param))
    directory = save_checkpoint(ref, tmp_path_factory.mktemp(f"bf{request.param}"))
    return ref, copy.deepcopy(ref).to(torch.bfloat16), model.load_pretrained(directory, dtype="bfloat16")


def batch(lengths, images_per_row, seed):
    """Right-padded prompts, [boi, image x MM, eoi] spliced after the first token where asked."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n, k in zip(lengths, images_per_row):
        body = torch.randint(10, 512, (n,), generator=gen).tolist()
        rows.append(body[:1] + ([SPECIAL["boi"]] + [SPECIAL["image"]] * MM + [SPECIAL["eoi"]]) * k + body[1:])
    ids = torch.full((len(rows), max(len(r) for r in rows)), SPECIAL["pad"])
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    images = sum(images_per_row)
    pixels = torch.rand((images, 3, 32, 32), generator=gen) * 2 - 1 if images else None
    dec = torch.randint(10, 512, (len(rows), 9), generator=gen)
    dec[:, 0] = SPECIAL["bos"]
    return ids, mask, pixels, dec


@pytest.mark.parametrize("images_per_row", [[0, 0, 0, 0], [1, 2, 0, 1]], ids=["text", "images"])
@torch.no_grad()
def test_bfloat16_logits_as_close_to_float32_as_transformers_own(trio, images_per_row):
    ref32, ref16, ours16 = trio
    ids, mask, pixels, dec = batch([17, 9, 4, 12], images_per_row, seed=1)
    extra = {} if pixels is None else {"pixel_values": pixels}
    exact = ref32(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **extra).logits
    extra16 = {} if pixels is None else {"pixel_values": pixels.to(torch.bfloat16)}
    theirs = ref16(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **extra16).logits.float()
    ours = ours16(ids, mask, dec, pixel_values=None if pixels is None else pixels.to(torch.bfloat16)).float()
    for reduce in (torch.amax, torch.mean, p99):
        theirs_dev = reduce((theirs - exact).abs()).item()
        ours_dev = reduce((ours - exact).abs()).item()
        limit = RATIO[reduce.__name__]
        assert ours_dev <= limit * theirs_dev, (f"{reduce.__name__}: ours {ours_dev:.4g} vs transformers "
                                                f"{theirs_dev:.4g}")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bfloat16_generation_gives_valid_results(trio, compiled):
    _, _, ours16 = trio
    gen = torch.Generator().manual_seed(3)
    reqs = [model.Request(torch.randint(10, 512, (n,), generator=gen).tolist(),
                          params=model.GenerationParams(max_new_tokens=12, min_new_tokens=m))
            for n, m in ((3, 0), (15, 4), (8, 0), (22, 12))]
    reqs.append(model.Request(reqs[0].input_ids, params=model.GenerationParams(max_new_tokens=8, num_beams=2)))
    options = {"compile": True, "compile_options": {"backend": "eager"}} if compiled else {}
    g = model.Generator(ours16, **options)
    for req, res in zip(reqs, g.generate(reqs)):
        p = req.params
        assert res.finish_reason in ("eos", "length")
        assert p.min_new_tokens <= len(res.token_ids) <= p.max_new_tokens
        assert all(0 <= t < ours16.config.vocab_size for t in res.token_ids)
        assert (res.token_ids[-1] == SPECIAL["eos"]) == (res.finish_reason == "eos")
        assert SPECIAL["eos"] not in res.token_ids[:-1]
    assert g.compile_fallback is None
