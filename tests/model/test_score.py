"""The Scorer against transformers' T5Gemma2ForConditionalGeneration (float32, CPU).

The reference score of a candidate is what its teacher-forced forward gives: decoder input
[bos, t1 .. tn], log-softmax of the logits, the log-probabilities of [t1 .. tn, eos] summed (or
averaged per token, "mean"). Each (prompt, candidate) pair runs through the reference alone; ours
scores them all together, several prompts and every candidate of a prompt in one decoder pass.
Random checkpoints of every test shape (grouped-query, multi-head and multi-query attention,
final-logit soft-capping in B), candidates longer than the decoder's sliding windows, prompts
longer than the encoder's; text and images. Tolerance 1e-4 on each score (log-probability units).
"""

from __future__ import annotations

import pytest
import torch

import model
from helpers.checkpoints import SHAPES, SPECIAL, build_reference, random_prompts, save_checkpoint
from model import score as score_module
from model.score import ScoreBatch, Scorer, ScoreRequest

TOLERANCE = 1e-4
MM = 4  # mm_tokens_per_image of the test checkpoints


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    ref = build_reference(SHAPES[request.param], seed=ord(request.param) + 7)
    directory = save_checkpoint(ref, tmp_path_factory.mktemp(f"score{request.param}"))
    return ref, model.load_pretrained(directory)


def image_prompt(n_text: int, n_images: int, seed: int) -> list[int]:
    body = random_prompts([n_text], seed=seed)[0]
    block = [SPECIAL["boi"]] + [SPECIAL["image"]] * MM + [SPECIAL["eoi"]]
    return body[:1] + block * n_images + body[1:]


@torch.no_grad()
def reference_scores(ref, request: ScoreRequest) -> tuple[list[float], list[int]]:
    """(summed log-probs, token counts) of each candidate, one reference forward per candidate."""
    sums, lengths = [], []
    ids = torch.tensor([request.input_ids])
    for cand in request.candidates:
        dec = torch.tensor([[SPECIAL["bos"]] + cand])
        kwargs = {"pixel_values": request.pixel_values} if request.pixel_values is not None else {}
        logits = ref(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec, **kwargs).logits
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
        targets = cand + [SPECIAL["eos"]]
        sums.append(sum(logprobs[i, t].item() for i, t in enumerate(targets)))
        lengths.append(len(targets))
    return sums, lengths


def assert_matches_reference(ref, requests, results):
    for n, (req, got) in enumerate(zip(requests, results)):
        assert got.error is None, (n, got.error)
        sums, lengths = reference_scores(ref, req)
        assert got.lengths == lengths
        for mode, want in (("sum", sums), ("mean", [s / k for s, k in zip(sums, lengths)])):
            mine = got.scores(mode)
            worst = max(abs(a - b) for a, b in zip(mine, want))
            assert worst <= TOLERANCE, f"request {n} ({mode}): max |diff| {worst:.2e}; ours {mine}, reference {want}"


def text_requests(seed: int = 0) -> list[ScoreRequest]:
    """Prompts longer than every encoder window, 1 to 5 candidates each, of 1 to 8 tokens (longer than
    the decoder windows too), in no particular order."""
    prompts = random_prompts([17, 9, 4, 12], seed=seed)
    counts, lengths = [3, 1, 5, 2], [[1, 4, 8], [2], [1, 1, 3, 6, 2], [7, 1]]
    cands = iter(random_prompts([n for row in lengths for n in row], seed=seed + 1))
    return [ScoreRequest(p, [next(cands) for _ in range(k)]) for p, k in zip(prompts, counts)]


def test_text_scores_equal_the_reference_sum_and_mean(pair):
    ref, ours = pair
    requests = text_requests()
    scorer = Scorer(ours, max_batch_tokens=4096)
    results = scorer.score(requests)
    assert_matches_reference(ref, requests, results)
    assert scorer.stats.micro_batches == 1 and scorer.stats.decoder_passes == 1  # one encoder call, one decoder pass


def test_image_scores_equal_the_reference(pair):
    ref, ours = pair
    gen = torch.Generator().manual_seed(5)
    requests = []
    for n, (n_text, n_images) in enumerate([(6, 1), (13, 2), (3, 1)]):
        pixels = torch.rand((n_images, 3, 32, 32), generator=gen) * 2 - 1
        requests.append(ScoreRequest(image_prompt(n_text, n_images, seed=n), random_prompts([1, 3, 2], seed=10 + n),
                                     pixels))
    results = Scorer(ours, max_batch_tokens=4096).score(requests)
    assert_matches_reference(ref, requests, results)
    # The image really matters: other pixels, other scores.
    flipped = [ScoreRequest(r.input_ids, r.candidates, -r.pixel_values) for r in requests]
    other = Scorer(ours).score(flipped)
    assert max(abs(a - b) for x, y in zip(results, other) for a, b in zip(x.sums, y.sums)) > 1e-3


def test_uint8_pixels_are_finished_on_the_device_by_the_normalizer(pair):
    """As the pipeline ships images (uint8, ImageProcessor.resize), the scorer's pixel_normalizer makes the
    float pixels; the scores are those of the float pixels given directly. Without one, uint8 is refused."""
    from model.images import ImageProcessor, ImageProcessorConfig

    _, ours = pair
    normalizer = ImageProcessor(ImageProcessorConfig(height=32, width=32)).normalizer()
    raw = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    ids, cands = image_prompt(5, 1, seed=2), random_prompts([2, 3], seed=4)
    (from_uint8,) = Scorer(ours, pixel_normalizer=normalizer).score([ScoreRequest(ids, cands, raw)])
    (from_float,) = Scorer(ours).score([ScoreRequest(ids, cands, normalizer(raw))])
    assert from_uint8.error is None and from_uint8.sums == from_float.sums
    (refused,) = Scorer(ours).score([ScoreRequest(ids, cands, raw)])
    assert refused.error_kind == "invalid_request" and "pixel_normalizer" in refused.error


def test_the_cross_keys_are_the_requests_own_never_copied_per_candidate(pair, monkeypatch):
    """The cross part reads [R, Hkv, S, D] keys, the very tensors the projection made, whatever the
    number of candidates: no per-candidate copy (expand, repeat, index) exists to be read."""
    _, ours = pair
    made, read = [], []
    real_cross_kv, real_scores = type(ours).cross_kv, score_module.cross_attention_scores

    def cross_kv(self, memory, padding=None):
        for k, v in real_cross_kv(self, memory, padding):
            made.append(k.data_ptr())
            yield k, v

    def scores(q, keys, scale):
        read.append((keys.data_ptr(), tuple(keys.shape), q.shape[1]))
        return real_scores(q, keys, scale)

    monkeypatch.setattr(type(ours), "cross_kv", cross_kv)
    monkeypatch.setattr(score_module, "cross_attention_scores", scores)
    requests = text_requests()
    Scorer(ours, max_batch_tokens=4096).score(requests)
    layers = len(ours.decoder.layers)
    assert len(read) == layers and [ptr for ptr, _, _ in read] == made
    for _, shape, candidates in read:
        assert shape[0] == len(requests) and candidates == max(len(r.candidates) for r in requests)


def test_over_budget_candidates_are_chunked_against_one_encoder_call(pair):
    ref, ours = pair
    requests = text_requests(seed=3)
    whole = Scorer(ours, max_batch_tokens=4096).score(requests)
    tight = Scorer(ours, max_batch_tokens=4096, max_score_elements=600)  # a few candidates per pass at most
    chunked = tight.score(requests)
    assert tight.stats.decoder_passes > len(requests) and tight.stats.micro_batches == len(requests)
    for a, b in zip(whole, chunked):
        assert max(abs(x - y) for x, y in zip(a.sums, b.sums)) <= 1e-5
    assert_matches_reference(ref, requests, chunked)


def test_planning_bounds_the_decoder_pass_not_a_long_prompt(pair):
    """A prompt longer than the token budget still scores all its candidates in one pass (its encoder runs
    alone, as the Generator's does); only candidates over the decoder bounds are chunked."""
    _, ours = pair
    scorer = Scorer(ours, max_batch_tokens=64)
    long = ScoreRequest(random_prompts([100])[0], random_prompts([2, 3, 1]))
    many = ScoreRequest(random_prompts([5])[0], random_prompts([3] * 40))  # 40 x 4 decoder tokens > 64
    short = [ScoreRequest(p, [[11]]) for p in random_prompts([4, 6, 5])]
    plan = scorer.plan([long, many, *short], [2, 4, 3, 1, 0])
    assert ScoreBatch((0,)) in plan  # alone (over the encoder budget), all three candidates at once
    (chunked,) = [b for b in plan if b.requests == (1,)]
    assert chunked.chunk is not None and 1 < chunked.chunk < 40 and chunked.chunk * 4 <= 64
    assert sorted(i for b in plan for i in b.requests) == [0, 1, 2, 3, 4]


def test_a_request_scores_the_same_alone_and_in_any_batch(pair):
    _, ours = pair
    requests = text_requests(seed=4)
    together = Scorer(ours, max_batch_tokens=4096).score(requests)
    for req, want in zip(requests, together):
        (alone,) = Scorer(ours).score([req])
        assert max(abs(a - b) for a, b in zip(alone.sums, want.sums)) <= 1e-5
    small = Scorer(ours, max_batch_tokens=40).score(requests)  # other micro-batches
    for a, b in zip(small, together):
        assert max(abs(x - y) for x, y in zip(a.sums, b.sums)) <= 1e-5


def test_out_of_memory_halves_then_fails_only_the_request_that_cannot_fit(pair, monkeypatch):
    _, ours = pair
    requests = text_requests(seed=6)
    want = Scorer(ours, max_batch_tokens=4096).score(requests)
    real = Scorer._decode

    def tight(self, reqs, ranges, memory, mask):  # "device memory" for 2 candidates per pass
        if sum(b - a for a, b in ranges) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, reqs, ranges, memory, mask)

    monkeypatch.setattr(Scorer, "_decode", tight)
    scorer = Scorer(ours, max_batch_tokens=4096)
    got = scorer.score(requests)
    assert scorer.stats.oom_splits > 0
    for a, b in zip(got, want):
        assert a.error is None and max(abs(x - y) for x, y in zip(a.sums, b.sums)) <= 1e-5

    def broke(self, reqs, ranges, memory, mask):  # nothing fits
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Scorer, "_decode", broke)
    results = Scorer(ours).score(requests)
    assert {r.error_kind for r in results} == {"out_of_memory"}
    assert all("even alone" in r.error for r in results)


def test_malformed_requests_fail_alone(pair):
    _, ours = pair
    good = text_requests()[0]
    vocab = ours.config.vocab_size
    bad = [ScoreRequest(good.input_ids, []), ScoreRequest(good.input_ids, [[5], []]),
           ScoreRequest([], [[5]]), ScoreRequest(good.input_ids, [[vocab]]),
           ScoreRequest([11, SPECIAL["image"], 12], [[5]])]
    results = Scorer(ours).score([good, *bad])
    assert results[0].error is None and len(results[0].sums) == len(good.candidates)
    assert [r.error_kind for r in results[1:]] == ["invalid_request"] * len(bad)
    messages = [r.error for r in results[1:]]
    assert "no candidates" in messages[0] and "candidate 1 has no tokens" in messages[1]
    assert "empty prompt" in messages[2] and "out of range" in messages[3] and "image-token" in messages[4]
    with pytest.raises(ValueError, match="score mode"):
        results[0].scores("max")
