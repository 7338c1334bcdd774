"""Long documents in chunks (input.long_input = "chunk"): where texts are cut, how outputs are joined, and
the map-reduce through Infer with the tiny real checkpoint, its SentencePiece tokenizer and a Generator
that records every call it gets."""

from __future__ import annotations

import pyarrow as pa
import pytest

import model.weights
from helpers.generator_faults import fail_on_prompt
from model.generate import GenerationParams, Generator, Request
from model.tokenizer import Tokenizer
from operators import chunking
from operators import columns as C
from operators.chunking import PARAGRAPH, SENTENCE, Frame, group_outputs, split_pieces, text_units
from operators.finish import Finish
from operators.infer import Infer, InferTask
from operators.prepare import Prepare, PromptTask

SUMMARIZE = PromptTask("s", "Summarize: {text}\nSummary:")
PARAMS = GenerationParams(max_new_tokens=6, min_new_tokens=6)  # every output exactly 6 tokens


# ---- cutting (no tokenizer: units and token ids) --------------------------------------------------


def test_units_start_at_paragraph_and_sentence_boundaries_and_give_the_text_back():
    text = ('  First one. Second "quoted!" Third?\n\nA new paragraph… with 3.5 items\nand a line.'
            '今天很好。明天呢？ End')
    units = text_units(text)
    assert "".join(u for u, _ in units) == text
    assert units == [('  First one.', PARAGRAPH), (' Second "quoted!"', SENTENCE), (" Third?", SENTENCE),
                     ("\n\nA new paragraph…", PARAGRAPH), (" with 3.5 items", SENTENCE),
                     ("\nand a line.今天很好。", SENTENCE), ("明天呢？", SENTENCE), (" End", SENTENCE)]
    assert text_units("no boundary at all") == [("no boundary at all", PARAGRAPH)]


def test_pieces_cut_inside_a_paragraph_only_when_it_cannot_fit():
    ids = iter(range(1000))
    sizes = [(4, PARAGRAPH), (4, SENTENCE), (4, SENTENCE),  # a paragraph of 12: fits, whole
             (3, PARAGRAPH), (3, SENTENCE),  # 6: fits, whole
             (10, PARAGRAPH), (10, SENTENCE), (10, SENTENCE),  # 30: over 20, so its sentences are the parts
             (25, PARAGRAPH)]  # one sentence of 25: over 20, cut into token runs
    units = [[next(ids) for _ in range(n)] for n, _ in sizes]
    pieces = split_pieces(units, [level for _, level in sizes], budget=20)
    flat = [t for u in units for t in u]
    assert [t for p in pieces for t in p] == flat  # the pieces are the text's ids, in order
    assert [len(p) for p in pieces] == [18, 20, 10, 20, 5]
    # Cuts: after paragraph 2 (the next does not fit), between the third paragraph's sentences, and
    # inside the 25-token sentence only because no boundary is left.
    assert pieces[0] == flat[:18] and pieces[1] == units[5] + units[6] and pieces[2] == units[7]
    # A paragraph that fits a piece of its own is not cut to fill the piece before it.
    ten, five, ten_more = list(range(10)), list(range(10, 15)), list(range(15, 25))
    assert split_pieces([ten, five, ten_more], [PARAGRAPH, PARAGRAPH, SENTENCE], budget=20) == [ten, five + ten_more]
    assert split_pieces([[1, 2], [3]], [PARAGRAPH, SENTENCE], budget=20) == [[1, 2, 3]]
    with pytest.raises(ValueError, match="budget"):
        split_pieces([[1]], [PARAGRAPH], budget=0)


def test_a_token_cut_never_splits_a_character():
    continues = lambda token: 900 <= token < 1000  # noqa: E731  (byte-fallback continuation bytes)
    ids = [1, 2, 3, 5, 901, 902, 6, 7]
    assert split_pieces([ids], [PARAGRAPH], budget=4, continues_char=continues) == [[1, 2, 3], [5, 901, 902, 6], [7]]
    assert split_pieces([ids], [PARAGRAPH], budget=4) == [[1, 2, 3, 5], [901, 902, 6, 7]]


def test_outputs_are_grouped_into_prompts_that_fit_or_refused_when_they_never_could():
    frame = Frame(prefix=(2, 10), separator=(7,), suffix=(11,), limit=12)
    assert frame.wrap([[1, 1], [3]]) == [2, 10, 1, 1, 7, 3, 11] and frame.length([2, 1]) == 7
    assert group_outputs([[5] * 4] * 5, frame) == [[0, 1], [2, 3], [4]]  # 2 + 4 + 1 + 4 + 1 = 12 per pair
    assert group_outputs([[5] * 4], frame) == [[0]]
    assert group_outputs([[5] * 9] * 3, frame) is None  # each fits alone, no two together: no progress
    assert group_outputs([[5] * 4, [5] * 10], frame) is None  # one does not fit even alone
    assert Frame.from_row(frame.to_row()) == frame


# ---- prepare, with the real tokenizer --------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return Tokenizer.from_pretrained(tiny_checkpoint)


def long_text(paragraphs: int, sentences: int = 4, tag: str = "") -> str:
    return "\n\n".join(" ".join(f"Sentence {tag}{p}-{i} is about the quick brown fox." for i in range(sentences))
                       for p in range(paragraphs))


def batch(texts: list) -> pa.Table:
    n = len(texts)
    return pa.table({C.UNIT: ["u"] * n, C.ROW: pa.array(range(n), type=pa.int64()), C.ID: [str(i) for i in range(n)],
                     C.TEXT: pa.array([t.encode() if isinstance(t, str) else t for t in texts], type=pa.binary())})


def unit_ids(tok, text: str) -> list[int]:
    """The text's ids as chunking reads it: unit by unit."""
    return [t for ids in tok.encode_prompts([u for u, _ in text_units(text)], add_bos=False) for t in ids]


def test_a_long_text_becomes_pieces_whose_prompts_fit(tok):
    limit, text = 96, long_text(3)
    short_text = "One short text. Two!\n\nThree?"
    out = Prepare(tok, None, [SUMMARIZE], max_input_tokens=limit, long_input="chunk")(batch([text, short_text]))
    cols = C.TaskColumns.of("s")
    assert out.column(cols.error_kind).to_pylist() == [None, None]
    prompts, short = out.column(cols.chunk_prompts).to_pylist()
    frame = Frame.from_row(out.column(cols.chunk_frame)[0].as_py())
    assert frame.prefix == tuple(tok.encode_prompt("Summarize: ")) and frame.suffix == tuple(
        tok.encode_prompt("\nSummary:", add_bos=False)) and frame.limit == limit
    assert frame.separator == tuple(tok.encode_one("\n\n", add_bos=False))
    assert len(prompts) > 3 and all(len(p) <= limit for p in prompts)
    pieces = [p[len(frame.prefix): len(p) - len(frame.suffix)] for p in prompts]
    assert all(frame.wrap([piece]) == p for piece, p in zip(pieces, prompts))
    assert [t for p in pieces for t in p] == unit_ids(tok, text)
    assert tok.decode_one([t for p in pieces for t in p]) == text
    assert [tok.decode_one(p).startswith(("Sentence", " Sentence", "\n\nSentence")) for p in pieces] == [True] * len(
        pieces)  # cut at sentence boundaries: every piece starts a sentence
    # The text that fits is not split: its prompt is what long_input = "error" gives.
    assert out.column(cols.prompt_ids).to_pylist()[0] is None and short is None
    plain = Prepare(tok, None, [SUMMARIZE], max_input_tokens=limit)(batch([short_text]))
    assert out.column(cols.prompt_ids).to_pylist()[1] == plain.column(cols.prompt_ids).to_pylist()[0]


def test_a_sentence_longer_than_a_piece_is_cut_at_tokens_and_hopeless_texts_are_errors(tok):
    cols = C.TaskColumns.of("s")
    prep = Prepare(tok, None, [SUMMARIZE], max_input_tokens=40, long_input="chunk")
    words = "word " * 60  # one sentence, no boundary in it
    out = prep(batch([words, "x <start_of_image> y " * 40, "word " * 5000]))
    kinds = out.column(cols.error_kind).to_pylist()
    assert kinds == [None, "prompt_images", "text_too_long"]
    assert "more than 256" in out.column(cols.error_message).to_pylist()[2]
    frame = Frame.from_row(out.column(cols.chunk_frame)[0].as_py())
    budget = 40 - len(frame.prefix) - len(frame.suffix)
    pieces = [p[len(frame.prefix): len(p) - len(frame.suffix)] for p in out.column(cols.chunk_prompts)[0].as_py()]
    assert [len(p) for p in pieces[:-1]] == [budget] * (len(pieces) - 1) and 0 < len(pieces[-1]) <= budget
    assert tok.decode_one([t for p in pieces for t in p]) == words
    with pytest.raises(ValueError, match="long_input = 'chunk' takes generating tasks"):
        Prepare(tok, None, [PromptTask("c", "{image} Caption:", uses_text=False, uses_image=True)], 64, "chunk")


# ---- map-reduce through Infer ----------------------------------------------------------------------


class RecordingGenerator(Generator):
    """A real Generator that keeps the prompts of every generate() call it gets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[list[list[int]]] = []

    def generate(self, requests):
        self.calls.append([list(r.input_ids) for r in requests])
        return super().generate(requests)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return model.weights.load_pretrained(tiny_checkpoint, dtype="float32")


def recording_infer(tiny_model, params=PARAMS):
    infer = Infer("unused", "float32", "cpu", [InferTask("s", params)], max_batch_tokens=8192, model=tiny_model)
    infer.generator = RecordingGenerator(tiny_model, max_batch_tokens=8192)
    return infer


def test_a_long_document_is_summarized_from_every_piece_and_batched_with_the_other_rows(tok, tiny_model):
    limit = 64
    texts = ["A short text.", long_text(4, tag="a"), "Another short one.", long_text(1, sentences=3, tag="b")]
    prepared = Prepare(tok, None, [SUMMARIZE], max_input_tokens=limit, long_input="chunk")(batch(texts))
    cols = C.TaskColumns.of("s")
    chunk_prompts = prepared.column(cols.chunk_prompts).to_pylist()
    frames = [Frame.from_row(f) if f else None for f in prepared.column(cols.chunk_frame).to_pylist()]
    infer = recording_infer(tiny_model)
    out = infer(prepared)
    calls = infer.generator.calls
    alone = Generator(tiny_model, max_batch_tokens=8192)

    def outputs_of(prompts):  # the prompts' outputs in a call of their own (generation is batch-invariant)
        return [result.token_ids for result in alone.generate([Request(p, params=PARAMS) for p in prompts])]

    # The first call holds the short rows' prompts and every piece of both long texts: one batch.
    for r in (0, 2):
        assert prepared.column(cols.prompt_ids)[r].as_py() in calls[0]
    assert all(p in calls[0] for r in (1, 3) for p in chunk_prompts[r]) and len(calls[0]) == 2 + sum(
        len(chunk_prompts[r]) for r in (1, 3))
    chunking_out = out.column(cols.chunking).to_pylist()
    for r in (1, 3):
        frame, prompts = frames[r], chunk_prompts[r]
        pieces = [p[len(frame.prefix): len(p) - len(frame.suffix)] for p in prompts]
        assert [t for p in pieces for t in p] == unit_ids(tok, texts[r])  # every piece, the whole text
        # Each round joins every output of the round before (their order kept), in prompts that fit.
        outputs, rounds, tokens = outputs_of(prompts), 0, sum(map(len, prompts))
        while True:
            groups = group_outputs(outputs, frame)
            joined = [frame.wrap([outputs[i] for i in g]) for g in groups]
            rounds += 1
            assert sorted(i for g in groups for i in g) == list(range(len(outputs)))
            assert all(len(p) <= limit for p in joined) and all(p in calls[rounds] for p in joined)
            tokens += sum(map(len, joined))
            outputs = outputs_of(joined)
            if len(joined) == 1:
                break
        assert out.column(cols.output_ids)[r].as_py() == outputs[0]  # the row's output: the last join's
        assert chunking_out[r] == {"chunks": len(prompts), "depth": rounds, "input_tokens": tokens}
    assert chunking_out[1]["depth"] >= 2 and chunking_out[3]["depth"] == 1
    # The rounds of both rows share calls: round 1 of each is in the second call.
    assert len(calls) == 1 + chunking_out[1]["depth"]
    assert [out.column(cols.output_ids)[r].as_py() for r in (0, 2)] == outputs_of(
        [prepared.column(cols.prompt_ids)[r].as_py() for r in (0, 2)])

    finished = Finish(tok, ["s"], {C.MODEL_SOURCE: "m", C.MODEL_REVISION: None, C.RUN_CONFIG_HASH: "h"})(out)
    assert finished.column(cols.chunks).to_pylist() == [1, chunking_out[1]["chunks"], 1, chunking_out[3]["chunks"]]
    assert finished.column(cols.chunk_depth).to_pylist() == [0, chunking_out[1]["depth"], 0, 1]
    assert finished.column(cols.input_tokens).to_pylist()[1] == chunking_out[1]["input_tokens"]
    assert finished.column(cols.output_tokens).to_pylist() == [6] * 4


def test_a_failed_piece_or_outputs_that_never_fit_fail_only_their_row(tok, tiny_model, monkeypatch):
    cols = C.TaskColumns.of("s")
    prep = Prepare(tok, None, [SUMMARIZE], max_input_tokens=64, long_input="chunk")
    prepared = prep(batch([long_text(1, sentences=3), "A short text.", long_text(1, sentences=3, tag="c")]))
    poisoned = prepared.column(cols.chunk_prompts)[2].as_py()[1]
    infer = recording_infer(tiny_model)
    fail_on_prompt(monkeypatch, infer.generator, poisoned)
    out = infer(prepared)
    assert out.column(cols.error_kind).to_pylist() == [None, None, "model_error"]
    message = out.column(cols.error_message)[2].as_py()
    assert message.startswith("piece 2 of ") and "kernel fault" in message
    assert out.column(cols.chunking).to_pylist()[2] is None and out.column(cols.output_ids)[0].as_py()
    # Outputs of 30 tokens: two never fit in a prompt of 64 with the template, so joining cannot end.
    long_outputs = recording_infer(tiny_model, GenerationParams(max_new_tokens=30, min_new_tokens=30))
    out = long_outputs(prep(batch([long_text(1, sentences=3), "A short text."])))
    assert out.column(cols.error_kind).to_pylist() == ["text_too_long", None]
    assert "cannot be joined" in out.column(cols.error_message)[0].as_py()
    assert chunking.MAX_CHUNKS == 256  # the README states it
