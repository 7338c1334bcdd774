"""Continuous refill (generate.py): finished slots take waiting requests, and no request can tell.

A request's greedy tokens and seeded samples must equal those of the request run alone, whatever
it arrives with, how many slots the run has, when the others finish (max_new_tokens, EOS lists,
min_new_tokens) and how often the loop checks. Tiny model, float32, CPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import model
from helpers.checkpoints import SPECIAL, random_prompts, tiny_pair

LENGTHS = [3, 11, 6, 17, 9, 24, 5, 14]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("tiny"))[1]


@pytest.fixture(scope="module")
def pool(tiny):
    """(prompt, its free greedy run of 16 tokens): EOS ids are picked from a prompt's own run, so
    rows end early at steps the test chooses."""
    ids = random_prompts(LENGTHS, seed=11)
    free = model.Generator(tiny).generate(
        [model.Request(p, params=model.GenerationParams(max_new_tokens=16, min_new_tokens=16)) for p in ids])
    return list(zip(ids, [r.token_ids for r in free]))


def request(pool, which: int, max_new: int, stop: int | None, min_new: int, sampled: bool, seed: int):
    prompt, run = pool[which]
    eos = (SPECIAL["eos"], run[stop]) if stop is not None else None
    if sampled:
        params = model.GenerationParams(max_new_tokens=max_new, min_new_tokens=min(min_new, max_new),
                                        temperature=1.1, top_k=40, top_p=0.9, seed=seed, eos_token_ids=eos)
    else:
        params = model.GenerationParams(max_new_tokens=max_new, min_new_tokens=min(min_new, max_new),
                                        eos_token_ids=eos)
    return model.Request(prompt, params=params)


def alone(tiny, reqs):
    gen = model.Generator(tiny)
    return [gen.generate([r])[0] for r in reqs]


def outcome(results):
    return [(r.token_ids, r.finish_reason) for r in results]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_refilled_requests_equal_the_request_alone(tiny, pool, data):
    n = data.draw(st.integers(2, 9), label="requests")
    reqs = [request(pool, data.draw(st.integers(0, len(pool) - 1)), data.draw(st.integers(1, 14)),
                    data.draw(st.none() | st.integers(0, 15)), data.draw(st.integers(0, 4)),
                    data.draw(st.booleans()), data.draw(st.integers(0, 2**40)))
            for _ in range(n)]
    slots = data.draw(st.integers(1, 4), label="slots")
    check_every = data.draw(st.sampled_from([1, 3, 8]), label="check_every")
    gen = model.Generator(tiny, max_batch_size=slots, check_every=check_every)
    got = gen.generate(reqs)
    assert outcome(got) == outcome(alone(tiny, reqs))
    assert gen.stats.slot_tokens == sum(len(r.token_ids) for r in got)


@pytest.mark.parametrize("compiled", [False, True])
def test_slots_refill_and_stay_full(tiny, pool, compiled):
    """Two slots, eight requests of different lengths: requests enter as others finish (several encoder
    calls, one run), the slots stay busy, and every request equals its run alone."""
    reqs = [request(pool, i, max_new=3 + 2 * i, stop=None, min_new=0, sampled=i % 3 == 1, seed=i)
            for i in range(len(pool))]
    options = {"compile": True, "compile_options": {"backend": "eager"}} if compiled else {}
    if compiled:
        torch._dynamo.reset()  # earlier tests' graphs count towards the recompile limit of the shared step
    gen = model.Generator(tiny, max_batch_size=2, check_every=1, **options)
    got = gen.generate(reqs)
    assert outcome(got) == outcome(alone(tiny, reqs))
    assert gen.stats.micro_batches >= 4, "waiting requests never took a finished row's slot"
    assert gen.compile_fallback is None
    if not compiled:  # compiled, the 2 slots are a bucket of 2; eager, checked every step: no idle slot-step
        assert gen.stats.slot_occupancy > 0.8, gen.stats


def test_refill_writes_the_new_request_over_the_old_one(tiny):
    """A cache row refilled with a request holds exactly what a fresh cache of that request holds."""
    ours = tiny
    a, b = random_prompts([20, 7], seed=4)
    with torch.inference_mode():
        mem_a = ours.encode(torch.tensor([a]), torch.ones(1, 20, dtype=torch.bool))
        mem_b = ours.encode(torch.tensor([b]), torch.ones(1, 7, dtype=torch.bool))
        cache = ours.start_decoding(mem_a, torch.ones(1, 20, dtype=torch.bool), 8, widths=[20], per_row=True)
        for _ in range(3):
            ours.decode_step(torch.tensor([SPECIAL["bos"]]), cache)
        cache.refill([0], ours.cross_kv(mem_b), torch.ones(1, 7, dtype=torch.bool), [7])
        fresh = ours.start_decoding(torch.nn.functional.pad(mem_b, (0, 0, 0, 13)),
                                    torch.arange(20)[None] < 7, 8, widths=[7], per_row=True)
        assert cache.position.tolist() == [0]
        for kind in cache.masks:
            assert torch.equal(cache.masks[kind], fresh.masks[kind])
        # Close, not bit-equal: the fresh cache projects 20 memory rows, the refill 7, and a matmul's
        # rounding may depend on its shape (it does on some CPUs' kernels).
        close = {"rtol": 1e-6, "atol": 1e-6}
        for old, new in zip(cache.layers, fresh.layers):
            torch.testing.assert_close(old.keys[:, :, old.size:], new.keys[:, :, new.size:], **close)
            torch.testing.assert_close(old.values[:, :, old.size:], new.values[:, :, new.size:], **close)
        torch.testing.assert_close(ours.decode_step(torch.tensor([SPECIAL["bos"]]), cache),
                                   ours.decode_step(torch.tensor([SPECIAL["bos"]]), fresh), **close)


def record_batch_rows(tiny, monkeypatch) -> list[int]:
    """The rows of every decode cache started from now on (start_decoding's memory), appended as they come."""
    batch_rows = []
    start = type(tiny).start_decoding

    def recording(self, memory, *args, **kwargs):
        batch_rows.append(memory.shape[0])
        return start(self, memory, *args, **kwargs)

    monkeypatch.setattr(type(tiny), "start_decoding", recording)
    return batch_rows


def test_memory_budget_sets_the_slots(tiny, pool, monkeypatch):
    """A memory budget of three slots' bytes: runs decode through three slots (not the token budget's
    eight), refill the rest, and every request still equals its run alone."""
    reqs = [request(pool, i, max_new=4 + i, stop=None, min_new=0, sampled=False, seed=0) for i in range(len(pool))]
    probe = model.Generator(tiny)
    width, steps = max(len(r.input_ids) for r in reqs), max(r.params.max_new_tokens for r in reqs) + 1
    budget = 3 * probe._slot_bytes(width, steps) + 1
    batch_rows = record_batch_rows(tiny, monkeypatch)
    gen = model.Generator(tiny, memory_budget=budget)
    got = gen.generate(reqs)
    assert batch_rows == [3]
    assert outcome(got) == outcome(alone(tiny, reqs))
    batch_rows.clear()
    model.Generator(tiny).generate(reqs)
    assert batch_rows == [len(reqs)]  # no budget on CPU: the token budget alone


def test_where_memory_plans_the_slots_padded_tokens_cap_them_only_when_asked(tiny, monkeypatch):
    """With a memory budget (a GPU's free memory, or memory_budget), the default token budget no longer
    caps a run's slots (on an H200 it held summarize's 2048-token rows to 32 slots): memory and
    max_batch_size do. An explicit max_batch_tokens still caps them; without a budget (CPU) the default does."""
    monkeypatch.setattr(model.generate, "DEFAULT_BATCH_TOKENS", 600)  # 2 slots at the width below
    reqs = [model.Request(p, params=model.GenerationParams(max_new_tokens=3)) for p in random_prompts([250] * 6)]
    batch_rows = record_batch_rows(tiny, monkeypatch)
    plenty = 1 << 40
    expected = model.Generator(tiny).generate(reqs)
    cases = [({}, 2), ({"memory_budget": plenty}, 6), ({"memory_budget": plenty, "max_batch_tokens": 600}, 2),
             ({"memory_budget": plenty, "max_batch_size": 4}, 4)]
    for options, slots in cases:
        batch_rows.clear()
        got = model.Generator(tiny, **options).generate(reqs)
        assert batch_rows[0] == slots, (options, batch_rows)
        assert outcome(got) == outcome(expected)


def test_cuda_slot_budget_counts_free_cached_and_held_memory_within_a_share(tiny):
    """The CUDA budget from its readings (GiB): free + allocator cache + the held decode state, less the
    margin; with a share of the card, what the process holds beyond that state counts against the share
    (two actors on an 80 GiB card, 30 GiB free: each gets its 40 less its own 6, not the 30 free twice)."""
    gib = 1 << 30

    def budget(share, free=30, cached=2, held=4, allocated=10, margin=0.0):
        return model.generate.cuda_slot_budget(free * gib, cached * gib, held * gib, allocated * gib, 80 * gib,
                                               share, margin) / gib

    assert budget(None) == 36  # free 30 + cached 2 + held 4
    assert budget(None, margin=0.25) == 27
    assert budget(0.5) == 34  # min(36, 40 - (10 - 4))
    assert budget(0.25) == 14  # min(36, 20 - 6)
    assert budget(0.05) == 0  # holding 6 of a 4 GiB share: no room (never negative)
    assert budget(0.5, free=10) == 16  # the card's free memory still binds (the neighbours took theirs)
    with pytest.raises(ValueError, match="memory_share"):
        model.Generator(tiny, memory_share=1.5)


def test_where_memory_binds_a_wide_request_runs_apart(tiny):
    """A memory budget makes width cost slots as the token budget does: a 1200-token prompt would leave a
    run two slots where the short prompts get 25, so it runs alone (the planner counts memory as _slots
    does); with memory to spare, one run takes all. Every row equals the unconstrained run's."""
    params = model.GenerationParams(max_new_tokens=4)
    reqs = [model.Request(p, params=params) for p in random_prompts([1200, 40, 20, 9, 5])]
    order = sorted(range(len(reqs)), key=lambda i: len(reqs[i].input_ids))
    probe = model.Generator(tiny)
    budget = 2 * probe._slot_bytes(1200, 5)
    tight = model.Generator(tiny, memory_budget=budget)
    assert [sorted(len(reqs[i].input_ids) for i in run) for run in tight.refill_runs(reqs, order)] == [
        [1200], [5, 9, 20, 40]]
    plenty = model.Generator(tiny, memory_budget=1 << 40)
    assert len(plenty.refill_runs(reqs, order)) == 1
    assert outcome(tight.generate(reqs)) == outcome(probe.generate(reqs))


def test_runs_split_only_where_width_costs_slots(tiny):
    """Where max_batch_size caps the slots, a wide request costs a narrow one no slot, so one run takes
    all (a second run would drain its own tail); where the token budget caps them, a request that would
    get under 1/RUN_SLOT_RATIO of its own run's slots starts a new run."""
    lengths = [300, 200, 120, 70, 40, 20, 9, 5]
    reqs = [model.Request(p) for p in random_prompts(lengths, seed=3)]
    order = sorted(range(len(reqs)), key=lambda i: len(reqs[i].input_ids))
    by_size = model.Generator(tiny, max_batch_size=2, max_batch_tokens=10**6)
    assert [sorted(len(reqs[i].input_ids) for i in run) for run in by_size.refill_runs(reqs, order)] == [
        sorted(lengths)]
    by_budget = model.Generator(tiny, max_batch_size=256, max_batch_tokens=600)  # 2 slots at 300, 8 at 70, 15 at 40
    runs = [sorted(len(reqs[i].input_ids) for i in run) for run in by_budget.refill_runs(reqs, order)]
    assert runs == [[70, 120, 200, 300], [5, 9, 20, 40]], runs
