"""The decode loop as a GPU runs it: host round-trips per step, and the checks that may come late.

Syncs are counted on CPU in eager mode, as a GPU would suffer them: every read of a tensor's
value by the host (item, bool, int, tolist, nonzero, .cpu(), boolean-mask indexing, ...).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import model
from helpers.checkpoints import SPECIAL, random_prompts, tiny_pair


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("tiny"))[1]


prompts = random_prompts


# Ops whose result the host must wait for (dispatch level: item/bool/int all land on _local_scalar_dense).
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
             "repeat_interleave"}
# Python-level reads: on CPU tensors these never reach the dispatcher as an op.
_SYNC_METHODS = {"tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__", "__complex__"}


class SyncCounter(TorchDispatchMode):
    """Counts host reads of tensor values while `counting` is on."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.counting = False
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if self.counting and (name in _SYNC_OPS or bool_index):
            if not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
                self.count += 1
                self.where.append(name)
        return func(*args, **kwargs)


class MethodCounter(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))
        if self.counter.counting and (name in _SYNC_METHODS or to_host):
            self.counter.count += 1
            self.counter.where.append(name)
        return func(*args, **(kwargs or {}))


def count_decode_syncs(gen: model.Generator, reqs, monkeypatch):
    """Run gen.generate(reqs) (one micro-batch); returns (results, sync counter, decode steps).

    Counting starts when the micro-batch's cache is ready (after the encoder) and stops when
    generate returns, so it covers the whole loop and the read of its tokens.
    """
    counter = SyncCounter()
    steps = [0]
    start = type(gen.model).start_decoding
    step = type(gen.model).decode_step

    def starting(self, *args, **kwargs):
        cache = start(self, *args, **kwargs)
        counter.counting = True
        return cache

    def stepping(self, *args, **kwargs):
        steps[0] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(type(gen.model), "start_decoding", starting)
    monkeypatch.setattr(type(gen.model), "decode_step", stepping)
    with counter, MethodCounter(counter):
        results = gen.generate(reqs)
    assert gen.stats.micro_batches == 1
    return results, counter, steps[0]


def mixed_batch(ours):
    """Greedy and sampled rows that stop at different steps: EOS lists built from each row's own tokens."""
    lengths = [3, 9, 14, 6, 20, 11]
    ids = prompts(lengths, seed=3)
    free = model.Generator(ours).generate(
        [model.Request(p, params=model.GenerationParams(max_new_tokens=40)) for p in ids])
    reqs = []
    for i, (p, res) in enumerate(zip(ids, free)):
        stop = 4 + 7 * i  # row i's EOS is its own token at step stop (when it generates that far)
        eos = (SPECIAL["eos"], res.token_ids[stop]) if len(res.token_ids) > stop + 1 else None
        if i % 3 == 2:  # sampled rows
            params = model.GenerationParams(max_new_tokens=40, temperature=0.9, top_k=20, top_p=0.9, seed=i)
        else:
            params = model.GenerationParams(max_new_tokens=12 + 6 * i, min_new_tokens=2, eos_token_ids=eos)
        reqs.append(model.Request(p, params=params))
    return reqs


def test_decode_loop_syncs_at_most_a_quarter_per_step(tiny, monkeypatch):
    reqs = mixed_batch(tiny)
    gen = model.Generator(tiny, check_every=8)
    results, counter, steps = count_decode_syncs(gen, reqs, monkeypatch)
    lengths = sorted({len(r.token_ids) for r in results})
    assert len(lengths) >= 4, f"rows should finish at different steps, got lengths {lengths}"
    assert steps >= 24
    assert counter.count <= 0.25 * steps, f"{counter.count} syncs over {steps} steps: {counter.where}"


def test_late_checks_change_no_tokens(tiny):
    """Rows that finished keep decoding until the next check: results equal those of checking every step."""
    reqs = mixed_batch(tiny)
    every = model.Generator(tiny, check_every=1, compact_fraction=0.0).generate(reqs)
    for k in (3, 16):
        late = model.Generator(tiny, check_every=k).generate(reqs)
        assert [(r.token_ids, r.finish_reason) for r in late] == [(r.token_ids, r.finish_reason) for r in every]
    assert {r.finish_reason for r in every} == {"eos", "length"}


def test_beam_search_syncs_at_most_a_quarter_per_step(tiny, monkeypatch):
    params = [model.GenerationParams(max_new_tokens=n, num_beams=3, min_new_tokens=m) for n, m in ((24, 0), (32, 5))]
    reqs = [model.Request(p, params=params[i % 2]) for i, p in enumerate(prompts([5, 13, 9, 2], seed=2))]
    gen = model.Generator(tiny, check_every=8)
    results, counter, steps = count_decode_syncs(gen, reqs, monkeypatch)
    assert steps >= 8 and all(r.token_ids for r in results)
    assert counter.count <= 0.25 * steps, f"{counter.count} syncs over {steps} steps: {counter.where}"
    # Checked at every step, the stop rule gives the same beams.
    every = model.Generator(tiny, check_every=1).generate(reqs)
    assert [r.token_ids for r in every] == [r.token_ids for r in results]


def test_greedy_choice_is_the_first_best_token():
    """Greedy takes max's indices (faster than argmax on CPU): on ties the first best token, as argmax
    and transformers' generate() pick it, in float32 and bfloat16."""
    from model.generate import _Sampler

    sampler = _Sampler([model.Request([5], params=model.GenerationParams())], 3, torch.device("cpu"), None)
    logits = torch.randn(3, 50)
    logits[0, [7, 30]] = 9.0  # a tie: 7 wins
    logits[1, :] = 2.0  # all tied: 0 wins
    logits[2, 41] = float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        assert sampler.choose(logits.to(dtype), torch.zeros(1, dtype=torch.long)).tolist() == [7, 0, 41]
