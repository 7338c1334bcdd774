"""The compiled decode step: one graph for all steps of a micro-batch, shared by micro-batches of
one bucket, the same tokens as eager decoding, and a fallback to eager when compiling fails.

Kept few and small: a real (inductor) compile takes tens of seconds on a 2-core machine, so only
one test pays for it; the others trace with dynamo and run the captured graph as is
(torch._dynamo.testing.CompileCounter), which is what recompilation is about.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import model
from helpers.checkpoints import SHAPES, SPECIAL, build_reference, random_prompts, save_checkpoint, tiny_pair


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("tiny"))[1]


prompts = random_prompts


def is_step_graph(graph) -> bool:
    """Whether dynamo's graph is a decode step's (its inputs come from the cache and the rows), not one of
    the encoder's compiled token-wise parts, which a compiling CPU Generator builds as well."""
    names = [node.name for node in graph.graph.nodes if node.op == "placeholder"]
    return any(name.startswith(("l_cache_", "l_rows_", "L_cache_", "L_rows_")) for name in names)


class StepCounter(CompileCounter):
    """CompileCounter of the decode steps' graphs alone (the encoder parts' graphs run, uncounted)."""

    def __call__(self, graph, example_inputs):
        if is_step_graph(graph):
            return super().__call__(graph, example_inputs)
        return graph.forward


def fixed_length(ids, n):
    """Requests that generate exactly n tokens each (EOS banned until then): no row leaves early."""
    params = model.GenerationParams(max_new_tokens=n, min_new_tokens=n)
    return [model.Request(p, params=params) for p in ids]


def tokens(results):
    return [(r.token_ids, r.finish_reason) for r in results]


def test_one_graph_for_every_step_and_for_micro_batches_of_one_bucket(tiny):
    torch._dynamo.reset()
    counter = StepCounter()
    gen = model.Generator(tiny, compile=True, compile_options={"backend": counter})
    first = fixed_length(prompts([5, 9, 20], seed=1), 20)  # 3 rows -> bucket 4, widths -> 64, steps -> 32
    got = gen.generate(first)
    assert counter.frame_count == 1, "recompiled across the steps of one micro-batch"
    assert gen.compile_fallback is None
    assert tokens(got) == tokens(model.Generator(tiny).generate(first))
    # Another micro-batch of the same bucket: other rows, lengths and max_new_tokens, same graph.
    second = fixed_length(prompts([7, 30, 12, 44], seed=2), 28)
    got = gen.generate(second)
    assert counter.frame_count == 1, "recompiled for a micro-batch of the same bucket"
    assert tokens(got) == tokens(model.Generator(tiny).generate(second))


def test_traced_step_bans_eos_before_min_new_tokens_row_by_row(tiny):
    """The traced step's EOS ban (an index_put_ into the logits, not eager's scatter_) holds per row: rows
    whose greedy first token is made their EOS id still generate min_new_tokens, a row without the ban
    stops at it, and the tokens are eager's."""
    ids = prompts([6, 11, 9], seed=7)
    firsts = [r.token_ids[0] for r in model.Generator(tiny).generate(fixed_length(ids, 1))]
    reqs = [model.Request(p, params=model.GenerationParams(max_new_tokens=8, min_new_tokens=m, eos_token_ids=(t,)))
            for p, t, m in zip(ids, firsts, (5, 0, 7))]
    torch._dynamo.reset()
    counter = StepCounter()
    got = model.Generator(tiny, compile=True, compile_options={"backend": counter}).generate(reqs)
    assert counter.frame_count >= 1
    assert tokens(got) == tokens(model.Generator(tiny).generate(reqs))
    assert got[1].token_ids == [firsts[1]] and got[1].finish_reason == "eos"
    for row, least in ((0, 5), (2, 7)):
        assert len(got[row].token_ids) >= least and got[row].token_ids[0] != firsts[row]


def test_rows_leaving_shrink_to_smaller_buckets_with_few_graphs(tiny):
    """Rows finishing at different steps leave the batch bucket by bucket; results stay eager's."""
    torch._dynamo.reset()
    counter = StepCounter()
    ids = prompts([3, 8, 5, 12, 6, 9, 4, 10, 7], seed=3)  # 9 rows -> bucket 16
    reqs = [model.Request(p, params=model.GenerationParams(max_new_tokens=4 + 5 * i, min_new_tokens=4 + 5 * i))
            for i, p in enumerate(ids)]
    gen = model.Generator(tiny, compile=True, compile_options={"backend": counter}, check_every=4)
    got = gen.generate(reqs)
    assert tokens(got) == tokens(model.Generator(tiny).generate(reqs))
    assert [len(r.token_ids) for r in got] == [4 + 5 * i for i in range(9)]
    assert gen.stats.decode_row_steps < 16 * 44, "rows never left the batch"
    assert counter.frame_count <= 3  # buckets 16 -> 8 -> 4 -> 2 -> 1: dynamo turns the row count dynamic


def test_compile_failure_falls_back_to_eager_with_one_warning(tiny):
    torch._dynamo.reset()

    attempts = []

    def broken(graph, example_inputs):
        attempts.append(1)
        raise RuntimeError("no compiler here (injected)")

    reqs = fixed_length(prompts([4, 11], seed=4), 6)
    gen = model.Generator(tiny, compile=True, compile_options={"backend": broken})
    with pytest.warns(RuntimeWarning, match="decoding eagerly") as caught:
        got = gen.generate(reqs) + gen.generate(reqs)
    assert len([w for w in caught if "decoding eagerly" in str(w.message)]) == 1
    assert "injected" in gen.compile_fallback
    assert tokens(got) == tokens(model.Generator(tiny).generate(reqs)) * 2
    # A later Generator of the same options does not try again (a failing compile can take a minute).
    tried = len(attempts)
    with pytest.warns(RuntimeWarning, match="failed earlier in this process"):
        again = model.Generator(tiny, compile=True, compile_options={"backend": broken})
    assert tokens(again.generate(reqs)) == tokens(got[:2]) and len(attempts) == tried
    assert not again.stats.compiled and "injected" in again.stats.compile_fallback


def test_a_failing_encoder_compile_leaves_the_encoder_eager_and_the_steps_compiled(tiny):
    """The encoder's compiled token-wise parts (CPU) that fail to build give way to the eager ones, with one
    warning, the same tokens, and no second try by later Generators of the process; the steps stay compiled."""
    torch._dynamo.reset()
    encoder_graphs = []

    def no_encoder(graph, example_inputs):
        if is_step_graph(graph):
            return graph.forward
        encoder_graphs.append(graph)
        raise RuntimeError("encoder kernel does not build (injected)")

    reqs = fixed_length(prompts([4, 30, 9], seed=6), 5)
    gen = model.Generator(tiny, compile=True, compile_options={"backend": no_encoder})
    with pytest.warns(RuntimeWarning, match="encoder's token-wise parts failed") as caught:
        got = gen.generate(reqs) + gen.generate(reqs)
    assert len([w for w in caught if "encoder's" in str(w.message)]) == 1
    assert not [w for w in caught if "decoding eagerly" in str(w.message)]
    assert gen.stats.compiled and gen.compile_fallback.startswith("encoder: ")
    assert tokens(got) == tokens(model.Generator(tiny).generate(reqs)) * 2
    tried = len(encoder_graphs)
    again = model.Generator(tiny, compile=True, compile_options={"backend": no_encoder})
    assert tokens(again.generate(reqs)) == tokens(got[:3]) and len(encoder_graphs) == tried


def test_a_failing_flex_step_falls_back_to_compiled_sdpa_steps(tiny):
    """A compiled FlexAttention step that fails to build is replaced by compiled SDPA steps, not eager
    ones, mid-run (refills included) and for later Generators of the process, with one warning each."""
    torch._dynamo.reset()
    graphs = []

    def no_flex(graph, example_inputs):  # dynamo's graphs run as traced; one holding FlexAttention fails
        flex = any("flex_attention" in str(node.target) for node in graph.graph.nodes)
        if is_step_graph(graph):
            graphs.append("flex" if flex else "sdpa")
        if flex:
            raise RuntimeError("flex kernel does not build (injected)")
        return graph.forward

    reqs = [
        model.Request(p, params=model.GenerationParams(max_new_tokens=3 + 2 * i))
        for i, p in enumerate(prompts([4, 19, 7, 12, 9], seed=8))]
    options = {"backend": no_flex}
    gen = model.Generator(tiny, compile=True, attention="flex", compile_options=options, max_batch_size=2)
    with pytest.warns(RuntimeWarning, match="compiled SDPA steps from here on") as caught:
        got = gen.generate(reqs)
    assert not [w for w in caught if "decoding eagerly" in str(w.message)]
    assert tokens(got) == tokens(model.Generator(tiny, max_batch_size=2).generate(reqs))
    assert graphs[0] == "flex" and "sdpa" in graphs and gen.stats.micro_batches >= 3
    assert gen.stats.compiled and gen.stats.attention == "sdpa" and gen.compile_fallback.startswith("flex: ")
    tried = graphs.count("flex")
    with pytest.warns(RuntimeWarning, match="failed earlier in this process"):
        again = model.Generator(tiny, compile=True, attention="flex", compile_options=options, max_batch_size=2)
    assert tokens(again.generate(reqs)) == tokens(got) and graphs.count("flex") == tried
    assert again.stats.compiled and again.stats.attention == "sdpa"


def test_inductor_step_gives_eager_and_reference_tokens(tmp_path):
    """The real compiler (inductor, C++ on CPU) on the soft-capped shape: greedy and beam rows equal
    transformers', sampled rows equal eager decoding's, EOS rules included."""
    torch._dynamo.reset()
    ref = build_reference(SHAPES["B"], seed=7)
    ours = model.load_pretrained(save_checkpoint(ref, tmp_path))
    ids = prompts([6, 17, 3, 11], seed=5)
    params = [model.GenerationParams(max_new_tokens=10),
              model.GenerationParams(max_new_tokens=14, min_new_tokens=9),
              model.GenerationParams(max_new_tokens=12, temperature=0.8, top_k=30, top_p=0.9, seed=3),
              model.GenerationParams(max_new_tokens=9, temperature=1.2, seed=4)]
    reqs = [model.Request(p, params=q) for p, q in zip(ids, params)]
    gen = model.Generator(ours, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would hide what this test is for
        got = gen.generate(reqs)
    assert gen.compile_fallback is None
    assert tokens(got) == tokens(model.Generator(ours).generate(reqs))
    for req, res in zip(reqs[:2], got[:2]):
        p = req.params
        out = ref.generate(input_ids=torch.tensor([req.input_ids]), attention_mask=torch.ones(1, len(req.input_ids)),
                           max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens, do_sample=False,
                           num_beams=1, eos_token_id=[SPECIAL["eos"]])[0, 1:].tolist()
        want = out[: out.index(SPECIAL["eos"]) + 1] if SPECIAL["eos"] in out else out
        assert res.token_ids == want
    # Beam search: its step compiled too (the cache reorder stays eager: see generate._beam_step).
    beam = model.GenerationParams(max_new_tokens=8, num_beams=3, length_penalty=0.6)
    reqs = [model.Request(p, params=beam) for p in prompts([5, 13, 2], seed=6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = model.Generator(ours, compile=True).generate(reqs)
    for req, res in zip(reqs, got):
        out = ref.generate(input_ids=torch.tensor([req.input_ids]), attention_mask=torch.ones(1, len(req.input_ids)),
                           max_new_tokens=8, do_sample=False, num_beams=3, length_penalty=0.6,
                           eos_token_id=[SPECIAL["eos"]])[0, 1:].tolist()
        want = out[: out.index(SPECIAL["eos"]) + 1] if SPECIAL["eos"] in out else out
        assert res.token_ids == want


def test_runs_of_one_shape_reuse_the_decode_buffers(tiny):
    """Compiled, a run of the last run's shape decodes in the same buffers, and rows leaving move to
    their front: every step of two generate() calls reads keys, positions and tokens at the same
    addresses (what a recorded CUDA graph needs to replay, not record again), with eager's tokens."""
    torch._dynamo.reset()
    gen = model.Generator(tiny, compile=True, compile_options={"backend": CompileCounter()}, check_every=2)
    addresses = []
    step = gen._step

    def recording(kind, cache, rows, *rest):
        addresses.append((cache.layers[0].keys.data_ptr(), cache.masks["sliding_attention"].data_ptr(),
                          cache.position.data_ptr(), cache.lengths.data_ptr(), rows.out.data_ptr(),
                          rows.done.data_ptr()))
        return step(kind, cache, rows, *rest)

    gen._step = recording
    for seed in (7, 8):  # 6 rows -> 8 slots, leaving as they finish (4..14 tokens): 8 -> 4 -> 2 -> 1
        ids = prompts([3, 9, 5, 12, 6, 10], seed=seed)
        reqs = [model.Request(p, params=model.GenerationParams(max_new_tokens=4 + 2 * i, min_new_tokens=4 + 2 * i))
                for i, p in enumerate(ids)]
        assert tokens(gen.generate(reqs)) == tokens(model.Generator(tiny).generate(reqs))
    assert gen.stats.decode_row_steps < 2 * 8 * 14, "rows never left the batch"
    assert len(set(addresses)) == 1, f"{len(set(addresses))} different buffer sets over {len(addresses)} steps"


def test_a_process_of_varied_runs_stays_compiled(tiny):
    """An actor serves many Ray Data batches: other rows, widths, lengths and sampling options per run.
    Past dynamo's default of 8 graphs per function, fullgraph=True raises and the process would decode
    eagerly for good; the Generator raises the limit (COMPILE_GRAPH_LIMIT), and the graphs level off."""
    torch._dynamo.reset()
    counter = StepCounter()
    with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default, whatever ran before
        gen = model.Generator(tiny, compile=True, compile_options={"backend": counter}, check_every=4)
        runs = [  # (rows, prompt lengths from, to, max_new_tokens, top_k, top_p; top_k None: greedy)
            (3, 5, 20, 6, None, 1.0), (1, 70, 90, 40, None, 1.0), (5, 3, 9, 6, 8, 1.0), (9, 100, 140, 65, None, 1.0),
            (2, 4, 8, 6, 0, 0.9), (17, 3, 30, 5, None, 1.0), (4, 60, 70, 35, 64, 1.0), (33, 3, 12, 4, None, 1.0),
            (6, 130, 140, 6, 0, 1.0), (3, 5, 9, 36, 2, 0.5), (12, 3, 200, 8, None, 1.0), (2, 3, 5, 3, 16, 0.8),
        ]
        for i, (rows, lo, hi, new, top_k, top_p) in enumerate(runs):
            lengths = torch.randint(lo, hi + 1, (rows,), generator=torch.Generator().manual_seed(i)).tolist()
            params = [model.GenerationParams(max_new_tokens=new + row % 7, temperature=0.0 if top_k is None else 0.8,
                                             top_k=top_k or 0, top_p=top_p, seed=i) for row in range(rows)]
            gen.generate([model.Request(p, params=q) for p, q in zip(prompts(lengths, seed=i), params)])
            assert gen.compile_fallback is None, f"run {i} fell back to eager: {gen.compile_fallback}"
    assert 8 < counter.frame_count <= model.generate.COMPILE_GRAPH_LIMIT


def test_compiled_cpu_steps_attend_in_length_groups_without_new_graphs(tiny):
    """Compiled on CPU, a step attends in groups of similar encoder length, like eager steps, with the
    groups as data (DecoderCache.group_table): refill changes them, the graph stays one (the tail, where
    slots drain to smaller buckets, compiles its own shapes, as before)."""
    torch._dynamo.reset()
    counter = StepCounter()
    gen = model.Generator(tiny, compile=True, compile_options={"backend": counter}, max_batch_size=16, check_every=2)
    tables = []
    step = gen._step

    def recording(kind, cache, rows, *rest):
        out = step(kind, cache, rows, *rest)
        tables.append((tuple(map(tuple, cache.group_table.tolist())), rows.done.shape[0], counter.frame_count))
        return out

    gen._step = recording
    lengths = [4 + (i * 7) % 17 if i % 3 else 230 + i for i in range(40)]  # short and long prompts mixed
    reqs = [model.Request(p, params=model.GenerationParams(max_new_tokens=3 + i % 9, min_new_tokens=3 + i % 9))
            for i, p in enumerate(prompts(lengths, seed=11))]
    got = gen.generate(reqs)
    assert tokens(got) == tokens(model.Generator(tiny).generate(reqs))
    assert gen.compile_fallback is None
    refilling = [(table, graphs) for table, slots, graphs in tables if slots == 16]  # before the tail drains
    assert max(sum(1 for a, b, _ in table if b > a) for table, _ in refilling) > 1, "never attended in groups"
    assert len({table for table, _ in refilling}) > 2, "refill never changed the groups"
    assert {graphs for _, graphs in refilling} == {1}, "a change of groups recompiled the step"


def test_width_ladder_takes_two_sizes_per_octave_for_static_steps():
    widths = (1, 64, 65, 129, 193, 257, 385, 513, 1025, 2048, 2049)
    ladder = [model.generate.width_bucket(w, ladder=True) for w in widths]
    assert ladder == [64, 64, 128, 192, 256, 384, 512, 768, 1536, 2048, 3072]
    assert [model.generate.width_bucket(w) for w in (1, 65, 257, 2049)] == [64, 128, 320, 2112]  # multiples of 64


def test_flex_runs_of_one_ladder_width_share_a_graph(tiny):
    """Compiled FlexAttention steps have static shapes (a graph per shape): runs whose widest prompts fall
    in one step of the width ladder (260 to 380 tokens: 384) share one graph (in multiples of 64: two)."""
    torch._dynamo.reset()
    counter = StepCounter()
    gen = model.Generator(tiny, compile=True, attention="flex", compile_options={"backend": counter})
    for i, widest in enumerate([260, 300, 330, 380]):
        reqs = fixed_length(prompts([widest, 20, 50, 90], seed=20 + i), 5)
        assert tokens(gen.generate(reqs)) == tokens(model.Generator(tiny).generate(reqs))
    assert gen.compile_fallback is None and counter.frame_count == 1


def test_static_flex_runs_shrink_only_to_tail_buckets(tiny):
    """Rows leaving a static-shape (FlexAttention) run shrink it to TAIL_BUCKETS sizes only, each a graph:
    40 rows of different lengths (bucket 48) take 2 graphs (48, 16), where shrinking bucket by bucket took 6
    (one per static shape); the finished rows a tail holds read no encoder keys; results stay eager's."""
    torch._dynamo.reset()
    counter = StepCounter()
    ids = prompts([3 + i % 11 for i in range(40)], seed=4)
    reqs = [model.Request(p, params=model.GenerationParams(max_new_tokens=2 + i, min_new_tokens=2 + i))
            for i, p in enumerate(ids)]
    gen = model.Generator(tiny, compile=True, attention="flex", compile_options={"backend": counter}, check_every=4)
    got = gen.generate(reqs)
    assert tokens(got) == tokens(model.Generator(tiny).generate(reqs))
    assert gen.compile_fallback is None
    assert gen.stats.decode_row_steps < 48 * 42, "rows never left the batch"
    assert counter.frame_count == 2
    # Finished rows held in the tail read no encoder keys any more: their lengths are zero.
    cache = gen._state[1]
    assert cache.lengths.tolist() == [0] * 16


def test_compile_encoder_says_whether_the_encoder_halves_compile(tiny):
    """On CPU a compiling Generator compiles the encoder's token-wise halves unless compile_encoder=False;
    compile_encoder=True compiles them with eager steps too. Tokens are the same every way."""
    kinds = []

    def recording(graph, example_inputs):
        kinds.append("step" if is_step_graph(graph) else "encoder")
        return graph.forward

    reqs = fixed_length(prompts([6, 25], seed=9), 4)
    expected = tokens(model.Generator(tiny).generate(reqs))
    for options, encoder_graphs in [({"compile": True}, True), ({"compile": True, "compile_encoder": False}, False),
                                    ({"compile": False, "compile_encoder": True}, True)]:
        torch._dynamo.reset()
        kinds.clear()
        gen = model.Generator(tiny, compile_options={"backend": recording}, **options)
        assert tokens(gen.generate(reqs)) == expected
        assert ("encoder" in kinds) == encoder_graphs and ("step" in kinds) == options["compile"], (options, kinds)
