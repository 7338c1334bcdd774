"""The generator against transformers' generate(), and its own promises: batch invariance,
per-seed sampling, stop rules, and the out-of-memory split path (float32, CPU).

Tests taking `decode_mode` run twice: eager, and with the compiled decode step (traced by dynamo,
the captured graph run as is, without paying for a C++ compile; the inductor compile itself is
tested once, in test_compiled_step.py). Compiled, micro-batches are
padded to row buckets and the step graph is shared, so these runs also test that padding rows
and bucketing change no token.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import model
from helpers.checkpoints import SHAPES, SPECIAL, build_reference, random_prompts, save_checkpoint, tiny_pair

MM = 4


@pytest.fixture(params=["eager", "compiled"])
def decode_mode(request, monkeypatch):
    """Every Generator built in the test decodes eagerly or with the compiled step."""
    if request.param == "eager":
        yield request.param
        return
    import torch._dynamo

    built = []
    runs = _GRAPH_RUNS[0]
    init = model.Generator.__init__

    def compiled_init(self, *args, **kwargs):
        init(self, *args, **dict(kwargs, compile=True, compile_options={"backend": _run_as_captured}))
        built.append(self)

    monkeypatch.setattr(model.Generator, "__init__", compiled_init)
    with torch._dynamo.config.patch(recompile_limit=64):
        yield request.param
    assert built and all(g.compile_fallback is None for g in built), "the compiled step fell back to eager"
    assert _GRAPH_RUNS[0] > runs, "no step ran through a captured graph"


_GRAPH_RUNS = [0]


def _run_as_captured(graph, example_inputs):
    """A dynamo backend that runs the captured graph as is, counting its runs."""
    def run(*args):
        _GRAPH_RUNS[0] += 1
        return graph.forward(*args)

    return run


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    ref = build_reference(SHAPES[request.param], seed=100 + ord(request.param))
    ours = model.load_pretrained(save_checkpoint(ref, tmp_path_factory.mktemp(f"g{request.param}")))
    return ref, ours


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("tiny"))


prompts = random_prompts


def image_request(n_text, n_images, seed, params):
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(10, 512, (n_text,), generator=gen).tolist()
    block = [SPECIAL["boi"]] + [SPECIAL["image"]] * MM + [SPECIAL["eoi"]]
    ids = body[:1] + block * n_images + body[1:]
    pixels = torch.rand((n_images, 3, 32, 32), generator=gen) * 2 - 1
    return model.Request(input_ids=ids, pixel_values=pixels, params=params)


def reference_tokens(ref, req: model.Request, **kwargs):
    """transformers generate() for one request, trimmed after the first EOS."""
    ids = torch.tensor([req.input_ids])
    extra = {"pixel_values": req.pixel_values} if req.pixel_values is not None else {}
    p = req.params
    eos = list(p.eos_token_ids) if p.eos_token_ids else [SPECIAL["eos"]]
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_new_tokens,
                       min_new_tokens=p.min_new_tokens, do_sample=False, num_beams=p.num_beams,
                       length_penalty=p.length_penalty, eos_token_id=eos, **extra, **kwargs)[0, 1:].tolist()
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out


def test_greedy_equals_reference_text_and_images(decode_mode, pair):
    ref, ours = pair
    params = model.GenerationParams(max_new_tokens=24)
    reqs = [model.Request(ids, params=params) for ids in prompts([3, 29, 8, 15, 1, 22, 11])]
    reqs += [image_request(6, 1, 1, params), image_request(12, 2, 2, params), image_request(2, 1, 3, params)]
    gen = model.Generator(ours, max_batch_tokens=80)  # small budget: several micro-batches
    results = gen.generate(reqs)
    assert gen.stats.micro_batches >= 3
    for req, res in zip(reqs, results):
        want = reference_tokens(ref, req)
        assert res.token_ids == want
        assert res.finish_reason == ("eos" if want[-1] == SPECIAL["eos"] else "length")
        assert len(want) == 24 or want[-1] == SPECIAL["eos"]


def test_decode_attention_in_length_groups_equals_reference(pair, monkeypatch):
    """A step's attention split into row groups by encoder length (cache.py) is still the reference's."""
    ref, ours = pair
    monkeypatch.setattr(model.cache.DecoderCache, "GROUP_MIN_KEYS", 0)  # split at every length change
    monkeypatch.setattr(model.cache.DecoderCache, "GROUP_WASTE", 1.0)
    caches = []
    start = type(ours).start_decoding

    def recording(self, *args, **kwargs):
        caches.append(start(self, *args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(type(ours), "start_decoding", recording)
    params = model.GenerationParams(max_new_tokens=16)
    # Lengths within a factor of two: one refill run (widths of one run may differ by up to 2x).
    reqs = [model.Request(ids, params=params) for ids in prompts([16, 29, 18, 25, 15, 22, 19], seed=5)]
    results = model.Generator(ours).generate(reqs)
    assert max(len(g) for c in caches for g in c.groups.values()) >= 4  # really split, even after compaction
    for req, res in zip(reqs, results):
        assert res.token_ids == reference_tokens(ref, req)


@pytest.mark.parametrize("beams, penalty", [(2, 1.0), (3, 0.6), (4, 2.0)])
def test_beam_search_equals_reference(decode_mode, tiny, beams, penalty):
    ref, ours = tiny
    params = model.GenerationParams(max_new_tokens=10, num_beams=beams, length_penalty=penalty)
    reqs = [model.Request(ids, params=params) for ids in prompts([5, 13, 9, 2], seed=beams)]
    for req, res in zip(reqs, model.Generator(ours).generate(reqs)):
        assert res.token_ids == reference_tokens(ref, req)


def test_stop_rules_eos_list_min_and_max(decode_mode, tiny):
    ref, ours = tiny
    ids = prompts([9], seed=4)[0]
    free = model.Generator(ours).generate([model.Request(ids, params=model.GenerationParams(max_new_tokens=12))])[0]
    assert len(free.token_ids) >= 4, "pick a prompt that runs a few tokens"
    third = free.token_ids[2]
    # An EOS list containing the third greedy token stops there, finish reason "eos".
    stop = model.GenerationParams(max_new_tokens=12, eos_token_ids=(SPECIAL["eos"], third))
    res = model.Generator(ours).generate([model.Request(ids, params=stop)])[0]
    assert res.token_ids == free.token_ids[: free.token_ids.index(third) + 1] and res.finish_reason == "eos"
    # min_new_tokens forbids those EOS ids until then; the reference agrees token for token.
    late = model.GenerationParams(max_new_tokens=12, min_new_tokens=6, eos_token_ids=(SPECIAL["eos"], third))
    res = model.Generator(ours).generate([model.Request(ids, params=late)])[0]
    assert len(res.token_ids) >= 6
    assert res.token_ids == reference_tokens(ref, model.Request(ids, params=late))
    # max_new_tokens caps the length with finish reason "length".
    short = model.GenerationParams(max_new_tokens=2, eos_token_ids=(511,))
    res = model.Generator(ours).generate([model.Request(ids, params=short)])[0]
    assert len(res.token_ids) == 2 and res.finish_reason == "length"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_batch_invariance(decode_mode, tiny, data):
    """A request's greedy tokens alone == its tokens in any batch, in any order, under any budget."""
    _, ours = tiny
    pool = prompts([1, 4, 7, 12, 19, 26, 33, 3], seed=9)
    params = [model.GenerationParams(max_new_tokens=n) for n in (5, 9, 14)]
    chosen = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=8))
    reqs = [model.Request(pool[i], params=params[i % 3]) for i in chosen]
    budget = data.draw(st.sampled_from([33, 64, 150, 10_000]))
    batched = model.Generator(ours, max_batch_tokens=budget).generate(reqs)
    alone_gen = model.Generator(ours)
    for req, res in zip(reqs, batched):
        alone = alone_gen.generate([req])[0]
        assert (res.token_ids, res.finish_reason) == (alone.token_ids, alone.finish_reason)


def test_sampling_reproducible_per_seed_across_batches(decode_mode, tiny):
    _, ours = tiny
    pool = prompts([6, 14, 3, 21, 9], seed=5)
    sample = model.GenerationParams(max_new_tokens=16, temperature=1.3, top_k=50, top_p=0.95, seed=1234)
    target = model.Request(pool[0], params=sample)
    alone = model.Generator(ours).generate([target])[0].token_ids
    others = [model.Request(p, params=model.GenerationParams(max_new_tokens=8, temperature=0.7, seed=i))
              for i, p in enumerate(pool[1:])]
    mixed = model.Generator(ours, max_batch_tokens=60).generate(others[:2] + [target] + others[2:])
    assert mixed[2].token_ids == alone
    # Another seed gives another sample; greedy is not what sampling at this temperature gives.
    other = model.Request(pool[0], params=model.GenerationParams(max_new_tokens=16, temperature=1.3, top_k=50,
                                                                 top_p=0.95, seed=99))
    greedy = model.Request(pool[0], params=model.GenerationParams(max_new_tokens=16))
    res_other, res_greedy = model.Generator(ours).generate([other, greedy])
    assert res_other.token_ids != alone and res_greedy.token_ids != alone
    # top_k = 1 leaves only the best token: sampling collapses to greedy.
    k1 = model.Request(pool[0], params=model.GenerationParams(max_new_tokens=16, temperature=2.0, top_k=1, seed=7))
    assert model.Generator(ours).generate([k1])[0].token_ids == res_greedy.token_ids


def test_sampling_follows_the_distribution(decode_mode, tiny):
    """Hash-noise Gumbel-max draws first tokens with the model's softmax probabilities."""
    _, ours = tiny
    ids = prompts([7], seed=8)[0]
    with torch.no_grad():
        probs = torch.softmax(ours(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                   torch.tensor([[SPECIAL["bos"]]]))[0, -1], -1)
    reqs = [model.Request(ids, params=model.GenerationParams(max_new_tokens=1, temperature=1.0, seed=s))
            for s in range(600)]
    firsts = torch.tensor([r.token_ids[0] for r in model.Generator(ours).generate(reqs)])
    top = probs.argsort(descending=True)[:3]
    for tok in top:
        freq = (firsts == tok).float().mean().item()
        assert abs(freq - probs[tok].item()) < 4 * (probs[tok].item() / 600) ** 0.5 + 0.01


def test_out_of_memory_splits_and_isolates(decode_mode, tiny, monkeypatch):
    _, ours = tiny
    reqs = [model.Request(p, params=model.GenerationParams(max_new_tokens=6)) for p in prompts([4, 9, 13, 2, 7, 11])]
    expected = model.Generator(ours).generate(reqs)
    poison = reqs[3].input_ids
    original = model.Generator._run_batch

    def flaky(self, batch):  # injected: batches over 2 requests, or holding the poison prompt, "do not fit"
        if len(batch) > 2 or any(r.input_ids == poison for r in batch):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, batch)

    monkeypatch.setattr(model.Generator, "_run_batch", flaky)
    gen = model.Generator(ours)
    results = gen.generate(reqs)
    assert gen.stats.oom_splits > 0
    for i, (got, want) in enumerate(zip(results, expected)):
        if i == 3:
            assert got.finish_reason == "error" and got.error_kind == "out_of_memory" and got.token_ids == []
        else:
            assert got.token_ids == want.token_ids


def test_invalid_requests_become_error_results(tiny):
    _, ours = tiny
    good = model.Request(prompts([5])[0], params=model.GenerationParams(max_new_tokens=3))
    bad = [
        model.Request([]),
        model.Request([10, 99999]),
        model.Request([10, SPECIAL["image"], 11]),  # image token but no image
    ]
    results = model.Generator(ours).generate([bad[0], good, bad[1], bad[2]])
    assert [r.error_kind for r in results] == ["invalid_request", None, "invalid_request", "invalid_request"]
    assert len(results[1].token_ids) == 3
    with pytest.raises(ValueError, match="min_new_tokens"):
        model.GenerationParams(max_new_tokens=3, min_new_tokens=5)
    with pytest.raises(ValueError, match="beam search with sampling"):
        model.GenerationParams(num_beams=2, temperature=0.5)


def test_plan_returns_micro_batches_with_their_shapes(tiny):
    _, ours = tiny
    lengths = [3, 5, 9, 12, 20, 30, 31, 70]
    reqs = [model.Request(p, params=model.GenerationParams(max_new_tokens=5 + i))
            for i, p in enumerate(prompts(lengths))]
    reqs.append(model.Request(prompts([4])[0], params=model.GenerationParams(max_new_tokens=7, num_beams=3)))
    order = sorted(range(len(reqs)), key=lambda i: (reqs[i].params.num_beams, len(reqs[i].input_ids)))
    plan = model.Generator(ours, max_batch_tokens=100).plan(reqs, order)
    assert [i for b in plan for i in b.requests] == order  # every request once, in order
    for batch in plan:
        members = [reqs[i] for i in batch.requests]
        assert {r.params.num_beams for r in members} == {batch.beams}
        assert batch.rows == len(members) * batch.beams
        assert batch.encoder_length == max(len(r.input_ids) for r in members)
        assert batch.rows * batch.encoder_length <= 100 or len(members) == 1
        assert batch.steps == max(r.params.max_new_tokens for r in members)
    assert plan[-1].beams == 3 and plan[-1].rows == 3
    # Compiled, the sampling micro-batches run at bucketed shapes: a handful of graphs per job.
    compiled = model.Generator(ours, max_batch_tokens=100, compile=True, compile_options={"backend": "eager"})
    for batch in compiled.plan(reqs, order)[:-1]:
        assert batch.rows in model.generate.ROW_BUCKETS
        assert batch.encoder_length % 64 == 0 and batch.steps % 32 == 0


def test_decode_attention_runs_without_the_cudnn_kernel(tiny, monkeypatch):
    """cuDNN's SDPA failed on an H200 under the decode masks (misaligned address, fatal to the process):
    every decode step's SDPA call, one group or several, runs with it switched off; the encoder's keeps it."""
    from torch.overrides import TorchFunctionMode

    seen = {"decode": [], "encoder": []}
    where = ["encoder"]
    decode_step = model.T5Gemma2.decode_step

    def watched_decode_step(self, *args, **kwargs):
        where[0] = "decode"
        try:
            return decode_step(self, *args, **kwargs)
        finally:
            where[0] = "encoder"

    monkeypatch.setattr(model.T5Gemma2, "decode_step", watched_decode_step)

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                seen[where[0]].append(torch.backends.cuda.cudnn_sdp_enabled())
            return func(*args, **(kwargs or {}))

    _, ours = tiny
    gen = model.Generator(ours, compile=False)
    params = model.GenerationParams(max_new_tokens=6, min_new_tokens=6)
    # Widths far apart, so the rows attend in several length groups as well as in one.
    reqs = [model.Request(p, params=params) for p in prompts([3, 200, 7, 190])]
    with Watch():
        gen.generate(reqs)
        gen.generate(reqs[:1])
    assert len(seen["decode"]) > 12 and not any(seen["decode"]), seen["decode"]
    assert seen["encoder"] and all(seen["encoder"])  # the flag reads true where nothing switched it off
