"""Prepare, Infer and Finish for the labeling tasks: open prompt templates over any column, prompts
from a column, classify by scoring (fixed and per-row labels, text and images), keep columns; with
the tiny checkpoint's real tokenizer, image processor and model."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

import model.weights
from helpers.pipeline_data import image_bytes
from model.images import ImageProcessor
from model.score import Scorer, ScoreRequest
from model.tokenizer import Tokenizer
from operators import columns as C
from operators.finish import Finish, FinishTask, probabilities
from operators.infer import Infer, InferTask
from operators.prepare import MAX_LABEL_TOKENS, MAX_LABELS, Prepare, PromptTask

PROVENANCE = {C.MODEL_SOURCE: "m", C.MODEL_REVISION: None, C.RUN_CONFIG_HASH: "h"}
ASK = PromptTask("answer", "Title: {title}\nQuestion: {question}\nAnswer:", uses_text=False,
                 fields=("question", "title"))
FREE = PromptTask("free", None, uses_text=False, prompt_column="prompt")
TOPIC = PromptTask("topic", "Topic of: {text}\nOne of: {labels}\nTopic:", classify=True,
                   labels=("sports", "politics", "science fiction"))
SEEN = PromptTask("seen", "{image} Which of these is in the picture: {labels}?", uses_text=False, uses_image=True,
                  classify=True, labels_column="candidates")


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return Tokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def net(tiny_checkpoint):
    return model.weights.load_pretrained(tiny_checkpoint, dtype="float32")


def batch(n: int, **columns) -> pa.Table:
    cols = {C.UNIT: pa.array(["u"] * n), C.ROW: pa.array(range(n), type=pa.int64()),
            C.ID: pa.array([f"r{i}" for i in range(n)])}
    for name, values in columns.items():
        cols[name] = values
    return pa.table(cols)


def fields(values: list) -> pa.Array:
    return pa.array([v.encode() if isinstance(v, str) else v for v in values], type=pa.large_binary())


def labels(values: list) -> pa.Array:
    return pa.array(values, type=pa.large_list(pa.large_string()))


def view(out: pa.Table, name: str):
    cols = C.TaskColumns.of(name)
    return (out.column(cols.prompt_ids).to_pylist(), out.column(cols.error_kind).to_pylist(),
            out.column(cols.error_message).to_pylist())


def test_template_fields_name_any_column_and_a_null_one_is_a_row_error(tok):
    prep = Prepare(tok, None, [ASK], max_input_tokens=256)
    titles = ["Cats", None, "Dogs", "", "Birds", "Fish"]
    questions = ["Do they purr?", "Why?", b"caf\xc3(", "Empty title?", "x <image_soft_token> y", "Wet? {text}"]
    out = prep(batch(6, **{C.field_column("title"): fields(titles), C.field_column("question"): fields(questions)}))
    ids, kinds, messages = view(out, "answer")
    assert kinds == [None, "field_missing", "text_invalid_utf8", None, "prompt_images", None]
    assert tok.decode_one(ids[0]) == "Title: Cats\nQuestion: Do they purr?\nAnswer:"
    assert tok.decode_one(ids[3]) == "Title: \nQuestion: Empty title?\nAnswer:"  # an empty field is just empty
    assert tok.decode_one(ids[5]).endswith("Question: Wet? {text}\nAnswer:")  # a value is never a template
    assert "{title}" in messages[1] and "'title'" in messages[1] and "'question'" in messages[2]


def test_a_prompt_column_is_each_rows_whole_prompt(tok):
    prep = Prepare(tok, None, [FREE], max_input_tokens=40, long_input="truncate")
    prompts = ["Write a haiku about {snow}.", None, "", "  \t", "word " * 100]
    out = prep(batch(5, **{C.field_column("prompt"): fields(prompts)}))
    ids, kinds, messages = view(out, "free")
    assert kinds == [None, "prompt_missing", "prompt_empty", "prompt_empty", None]
    assert tok.decode_one(ids[0]) == "Write a haiku about {snow}."
    assert 30 <= len(ids[4]) <= 40 and tok.decode_one(ids[4]).startswith("word word")  # truncate cuts the prompt
    assert "prompt_column 'prompt'" in messages[1]
    strict = Prepare(tok, None, [FREE], max_input_tokens=16)
    _, kinds, messages = view(strict(batch(1, **{C.field_column("prompt"): fields(["word " * 100])})), "free")
    assert kinds == ["text_too_long"] and "input.long_input" in messages[0]
    # A template without {text} or a prompt column has nothing to cut: too long either way, and says why.
    cut = Prepare(tok, None, [ASK], max_input_tokens=16, long_input="truncate")
    out = cut(batch(1, **{C.field_column("title"): fields(["long " * 50]), C.field_column("question"): fields(["?"])}))
    _, kinds, messages = view(out, "answer")
    assert kinds == ["text_too_long"] and "no {text} and no prompt_column" in messages[0]


def test_fixed_labels_are_tokenized_once_and_fill_the_labels_field(tok):
    prep = Prepare(tok, None, [TOPIC], max_input_tokens=256)
    out = prep(batch(2, **{C.TEXT: pa.array([b"The match ended 2-1.", None], type=pa.binary())}))
    ids, kinds, _ = view(out, "topic")
    cols = C.TaskColumns.of("topic")
    assert kinds == [None, "text_missing"]
    assert tok.decode_one(ids[0]) == ("Topic of: The match ended 2-1.\nOne of: sports, politics, science fiction\n"
                                      "Topic:")
    want = tok.encode(list(TOPIC.labels), add_bos=False)
    assert out.column(cols.candidates).to_pylist() == [want, None]
    assert out.column(cols.labels).to_pylist() == [list(TOPIC.labels), None]
    assert all(tok.eos_id not in c for c in want)  # the scorer appends EOS itself


def test_per_row_labels_and_their_errors(tok, tiny_checkpoint):
    prep = Prepare(tok, ImageProcessor.from_pretrained(tiny_checkpoint), [SEEN], max_input_tokens=256)
    rows = [["cat", "dog"], None, [], ["cat", None], ["cat", "cat"], ["cat", " "], ["x"] * (MAX_LABELS + 1),
            ["cat", "word " * MAX_LABEL_TOKENS], ["a red square"]]
    n = len(rows)
    out = prep(batch(n, **{C.IMAGE: pa.array([image_bytes()] * n, type=pa.binary()),
                           C.labels_column("candidates"): labels(rows)}))
    ids, kinds, messages = view(out, "seen")
    assert kinds == [None, "labels_missing", "labels_empty"] + ["labels_invalid"] * 5 + [None]
    assert "labels_column 'candidates'" in messages[1] and "repeat 'cat'" in messages[4]
    assert f"more than {MAX_LABELS}" in messages[6] and f"more than {MAX_LABEL_TOKENS}" in messages[7]
    cols = C.TaskColumns.of("seen")
    assert out.column(cols.labels).to_pylist()[8] == ["a red square"]
    assert out.column(cols.candidates).to_pylist()[0] == tok.encode(["cat", "dog"], add_bos=False)
    assert ids[0].count(tok.special.image) == 4  # the image is in the prompt
    assert "Which of these is in the picture: cat, dog?" in tok.decode_one(ids[0])


def test_a_column_missing_from_a_rows_file_is_that_rows_error_and_keep_columns_pass(tok):
    """The read stage marks rows of a file without the column (schema drift); prepare makes it their error."""
    internal = C.field_column("title")
    kind_col, message_col = C.read_error_columns(internal)
    prep = Prepare(tok, None, [ASK], max_input_tokens=256, keep=("url",))
    out = prep(batch(2, **{internal: pa.nulls(2, pa.large_binary()),
                           C.field_column("question"): fields(["a", "b"]),
                           kind_col: pa.array(["column_missing"] * 2), message_col: pa.array(["no title here"] * 2),
                           C.keep_column("url"): pa.array(["http://a", None])}))
    _, kinds, messages = view(out, "answer")
    assert kinds == ["column_missing"] * 2 and messages == ["no title here"] * 2
    assert out.column(C.keep_column("url")).to_pylist() == ["http://a", None]
    with pytest.raises(KeyError, match=r"__keep:url"):
        prep(batch(1, **{internal: fields(["t"]), C.field_column("question"): fields(["q"])}))


def test_infer_scores_every_classify_task_and_finish_chooses_labels(tok, net, tiny_checkpoint):
    tasks = [TOPIC, SEEN, ASK]
    prep = Prepare(tok, ImageProcessor.from_pretrained(tiny_checkpoint), tasks, max_input_tokens=256, keep=("url",))
    n = 5
    prepared = prep(batch(
        n, **{C.TEXT: pa.array([b"Rockets and moons.", b"Votes today.", None, b"Goal!", b"Robots."], type=pa.binary()),
              C.IMAGE: pa.array([image_bytes(color=(10 * i, 200, 30)) for i in range(n)], type=pa.binary()),
              C.labels_column("candidates"): labels([["cat", "dog", "square"], ["red"], ["a", "b"], [], ["x", "y"]]),
              C.field_column("title"): fields(["t"] * n), C.field_column("question"): fields(["q"] * n),
              C.keep_column("url"): pa.array([f"u{i}" for i in range(n)])}))
    infer_tasks = [InferTask("topic", None, score="mean"), InferTask("seen", None, uses_image=True, score="sum"),
                   InferTask("answer", model.GenerationParams(max_new_tokens=3))]
    processor = ImageProcessor.from_pretrained(tiny_checkpoint)
    infer = Infer("unused", "float32", "cpu", infer_tasks, max_batch_tokens=4096, model=net, keep=("url",),
                  image_processor=processor)
    out = infer(prepared)
    topic, seen = C.TaskColumns.of("topic"), C.TaskColumns.of("seen")
    assert out.column(topic.error_kind).to_pylist() == [None, None, "text_missing", None, None]
    assert out.column(seen.error_kind).to_pylist() == [None, None, None, "labels_empty", None]
    # The same numbers as the scorer gives each row alone.
    scorer = Scorer(net)
    for r in (0, 1, 3):
        (alone,) = scorer.score([ScoreRequest(prepared.column(topic.prompt_ids)[r].as_py(),
                                              prepared.column(topic.candidates)[r].as_py())])
        got = out.column(topic.candidate_scores)[r].as_py()
        assert max(abs(a - b) for a, b in zip(got, alone.scores("mean"))) <= 1e-5
    assert len(out.column(seen.candidate_scores)[0].as_py()) == 3 and out.column(seen.candidate_scores)[1].as_py()
    # The image task: prepare shipped uint8 pixels, finished on the device; the scores float pixels
    # preprocessed on the CPU give.
    (alone,) = scorer.score([ScoreRequest(prepared.column(seen.prompt_ids)[0].as_py(),
                                          prepared.column(seen.candidates)[0].as_py(),
                                          processor.preprocess(image_bytes(color=(0, 200, 30)))[None])])
    assert max(abs(a - b) for a, b in zip(out.column(seen.candidate_scores)[0].as_py(), alone.sums)) <= 1e-5
    assert out.column(C.keep_column("url")).to_pylist() == [f"u{i}" for i in range(n)]

    finish = Finish(tok, [FinishTask("topic", classify=True), FinishTask("seen", classify=True, multi_label=True,
                                                                         threshold=0.3), "answer"],
                    PROVENANCE, keep=("url",))
    rows = finish(out).to_pylist()
    assert [r["url"] for r in rows] == [f"u{i}" for i in range(n)]
    for r, row in enumerate(rows):
        if row["topic_error_kind"]:
            assert row["topic"] is None and row["topic_scores"] is None
            continue
        entries = row["topic_scores"]
        assert [e["label"] for e in entries] == list(TOPIC.labels)
        assert math.isclose(sum(e["probability"] for e in entries), 1.0, rel_tol=1e-9)
        assert row["topic"] == max(entries, key=lambda e: e["probability"])["label"]
        assert [e["score"] for e in entries] == out.column(topic.candidate_scores)[r].as_py()
    assert rows[1]["seen"] == ["red"]  # one candidate: probability 1
    for row in rows:
        if row["seen_error_kind"] is None:
            want = sorted((e for e in row["seen_scores"] if e["probability"] >= 0.3), key=lambda e: -e["probability"])
            assert row["seen"] == [e["label"] for e in want]
    assert rows[3]["seen"] is None and rows[3][C.ERROR_KIND] == "labels_empty"
    assert rows[2][C.ERROR_KIND] == "text_missing" and rows[2]["seen"] is not None


def test_probabilities_are_a_stable_softmax():
    assert probabilities([0.0, 0.0]) == [0.5, 0.5]
    big = probabilities([-1000.0, -1001.0])  # log-likelihoods far below zero: no underflow
    assert math.isclose(big[0], 1 / (1 + math.exp(-1))) and math.isclose(sum(big), 1.0)
