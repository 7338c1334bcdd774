"""Several outputs per request (GenerationParams.num_return_sequences): n samples, each seeded apart and
each equal to that sample run alone, or the n best beams, equal to transformers' generate(); the
prompt is encoded once for all n. Tiny model, float32, CPU.
"""

from __future__ import annotations

import pytest
import torch

import model
from helpers.checkpoints import SPECIAL, random_prompts, tiny_pair
from model.generate import _sample_request


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("tiny"))


def sampled(n: int, seed: int | None, max_new: int = 10) -> model.GenerationParams:
    return model.GenerationParams(max_new_tokens=max_new, temperature=1.3, top_k=50, seed=seed,
                                  num_return_sequences=n)


@pytest.mark.parametrize("seed", [None, 1234])
def test_samples_are_seeded_apart_and_each_equals_its_run_alone(tiny, seed):
    _, ours = tiny
    prompt, other = random_prompts([9, 14], seed=5)
    requests = [model.Request(prompt, params=sampled(4, seed)),
                model.Request(other, params=model.GenerationParams(max_new_tokens=6))]
    gen = model.Generator(ours)
    result, greedy = gen.generate(requests)
    assert greedy.sequences is None
    assert len(result.sequences) == 4
    assert (result.token_ids, result.finish_reason) == result.sequences[0]
    # Sample 0 is the request as it runs with n = 1; sample j as the request seeded for j runs alone.
    single = model.Generator(ours).generate([model.Request(prompt, params=sampled(1, seed))])[0]
    assert result.sequences[0] == (single.token_ids, single.finish_reason)
    for j, sequence in enumerate(result.sequences):
        alone = model.Generator(ours).generate([_sample_request(requests[0], j)])[0]
        assert sequence == (alone.token_ids, alone.finish_reason)
    assert len({tuple(ids) for ids, _ in result.sequences}) > 1, "the samples are all the same"
    # One encoder row per prompt, not per sample.
    assert gen.stats.real_encoder_tokens == len(prompt) + len(other)


def test_samples_with_images_encode_the_image_once(tiny):
    _, ours = tiny
    gen = torch.Generator().manual_seed(3)
    ids = [7] + [SPECIAL["boi"]] + [SPECIAL["image"]] * 4 + [SPECIAL["eoi"]] + [11, 12]
    pixels = torch.rand((1, 3, 32, 32), generator=gen) * 2 - 1
    calls = []
    embed = ours.embed_images

    def counting(pixel_values):
        calls.append(pixel_values.shape[0])
        return embed(pixel_values)

    ours.embed_images = counting
    try:
        result = model.Generator(ours).generate([model.Request(ids, pixels, params=sampled(3, 9))])[0]
    finally:
        del ours.embed_images
    assert calls == [1]
    assert len(result.sequences) == 3


@pytest.mark.parametrize("beams, n", [(3, 2), (4, 4)])
def test_n_best_beams_equal_the_reference(tiny, beams, n):
    ref, ours = tiny
    params = model.GenerationParams(max_new_tokens=8, num_beams=beams, num_return_sequences=n)
    reqs = [model.Request(p, params=params) for p in random_prompts([6, 11, 3], seed=beams)]
    for req, res in zip(reqs, model.Generator(ours).generate(reqs)):
        ids = torch.tensor([req.input_ids])
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                           num_beams=beams, num_return_sequences=n, eos_token_id=[SPECIAL["eos"]],
                           pad_token_id=SPECIAL["pad"])
        expected = []
        for row in out[:, 1:].tolist():  # transformers pads finished hypotheses after their EOS
            end = row.index(SPECIAL["eos"]) + 1 if SPECIAL["eos"] in row else len(row)
            expected.append(row[:end])
        assert [ids for ids, _ in res.sequences] == expected
        assert res.token_ids == expected[0]


def test_n_needs_sampling_or_enough_beams():
    with pytest.raises(ValueError, match="needs sampling"):
        model.GenerationParams(num_return_sequences=2)
    with pytest.raises(ValueError, match="needs sampling"):
        model.GenerationParams(num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match=">= 1"):
        model.GenerationParams(num_return_sequences=0)
