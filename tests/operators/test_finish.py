"""Finish: detokenized text, token counts, finish reasons, row-level errors and provenance."""

from __future__ import annotations

import pyarrow as pa
import pytest

from model.tokenizer import Tokenizer
from operators import columns as C
from operators.finish import Finish, FinishTask

PROVENANCE = {C.MODEL_SOURCE: "s3://models/tiny", C.MODEL_REVISION: None, C.RUN_CONFIG_HASH: "abc"}


def test_finish(tiny_checkpoint):
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    hello = tok.encode_one("Hello world", add_bos=False)
    a, b = C.TaskColumns.of("a"), C.TaskColumns.of("b")
    ints = pa.list_(pa.int32())
    batch = pa.table({
        C.UNIT: ["u"] * 3, C.ROW: pa.array([0, 1, 2], type=pa.int64()), C.ID: ["x", "y", "z"],
        a.prompt_ids: pa.array([[2, 5, 6], [2, 7], None], type=ints),
        a.output_ids: pa.array([hello + [tok.eos_id], hello, None], type=ints),
        a.finish_reason: ["eos", "length", None],
        a.error_kind: [None, None, "text_empty"], a.error_message: [None, None, "the text is empty"],
        b.prompt_ids: pa.array([[2], [2], [2]], type=ints),
        b.output_ids: pa.array([hello, None, None], type=ints),
        b.finish_reason: ["length", None, None],
        b.error_kind: [None, "out_of_memory", None], b.error_message: [None, "too big", None],
    })
    out = Finish(tok, ["a", "b"], PROVENANCE)(batch)
    rows = out.to_pylist()
    assert rows[0]["a"] == "Hello world" and rows[0]["a_output_tokens"] == len(hello) + 1
    assert rows[0]["a_input_tokens"] == 3 and rows[0]["a_finish_reason"] == "eos" and rows[0][C.ERROR_KIND] is None
    assert rows[1]["a"] == "Hello world" and rows[1]["b"] is None and rows[1]["b_input_tokens"] == 1
    assert rows[1][C.ERROR_KIND] == "out_of_memory" and rows[1][C.ERROR_MESSAGE] == "b: too big"
    assert rows[2][C.ERROR_KIND] == "text_empty" and rows[2]["a_input_tokens"] is None
    # no error kind and no output would be a silent loss: it becomes a visible model_error
    assert rows[2]["b_error_kind"] == "model_error" and rows[2]["b"] is None
    assert {r[C.RUN_CONFIG_HASH] for r in rows} == {"abc"} and rows[0][C.MODEL_SOURCE] == "s3://models/tiny"
    assert C.UNIT in out.column_names and a.output_ids not in out.column_names
    with pytest.raises(ValueError, match="provenance lacks"):
        Finish(tok, ["a"], {})


def test_quality_flags(tiny_checkpoint):
    """Per output: a normal text has no flag; a loop cut at the length limit, an output of only EOS,
    and (for a task with a target language) text in another language are flagged; error rows have
    null flags. With two sequences, each sequence has its own list."""
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    encode = lambda text: tok.encode_one(text, add_bos=False)  # noqa: E731
    normal = encode("The quick brown fox jumps over the lazy dog.") + [tok.eos_id]
    loop = (encode("Summary:") + encode(" the report covers sales.") * 12)[:64]
    german = encode("Das Wetter ist heute schön und die Sonne scheint über der Stadt.") + [tok.eos_id]
    english = encode("The weather is nice today and the sun is shining over the city.") + [tok.eos_id]
    ints, many = pa.list_(pa.int32()), pa.list_(pa.list_(pa.int32()))
    s, g, n = C.TaskColumns.of("summary"), C.TaskColumns.of("german"), C.TaskColumns.of("answers")
    errors = [None, None, None, "text_empty"]
    batch = pa.table({
        C.UNIT: ["u"] * 4, C.ROW: pa.array([0, 1, 2, 3], type=pa.int64()), C.ID: ["a", "b", "c", "d"],
        s.prompt_ids: pa.array([[2]] * 3 + [None], type=ints),
        s.output_ids: pa.array([normal, loop, [tok.eos_id], None], type=ints),
        s.finish_reason: ["eos", "length", "eos", None], s.error_kind: errors, s.error_message: errors,
        g.prompt_ids: pa.array([[2]] * 3 + [None], type=ints),
        g.output_ids: pa.array([german, english, encode("Ja.") + [tok.eos_id], None], type=ints),
        g.finish_reason: ["eos", "eos", "eos", None], g.error_kind: errors, g.error_message: errors,
        n.prompt_ids: pa.array([[2]] * 3 + [None], type=ints),
        n.output_ids: pa.array([[normal, loop], [normal, normal], [[tok.eos_id], normal], None], type=many),
        n.finish_reason: pa.array([["eos", "length"], ["eos", "eos"], ["eos", "eos"], None],
                                  type=pa.list_(pa.string())),
        n.error_kind: errors, n.error_message: errors,
    })
    tasks = [FinishTask("summary"), FinishTask("german", language="de"), FinishTask("answers", sequences=2)]
    out = Finish(tok, tasks, PROVENANCE)(batch)
    assert out.column("summary_flags").to_pylist() == [[], ["max_new_tokens", "repetition"], ["empty"], None]
    # "Ja." is too short for the detector to judge: no flag.
    assert out.column("german_flags").to_pylist() == [[], ["wrong_language"], [], None]
    assert out.column("answers_flags").to_pylist() == [[[], ["max_new_tokens", "repetition"]], [[], []],
                                                       [["empty"], []], None]
    for task in tasks:  # the types the output schema declares
        declared = {f.name: f.type for f in C.OutputTask(task.output_column, sequences=task.sequences).output_fields()}
        flags = C.TaskColumns.of(task.output_column).flags
        assert out.schema.field(flags).type == declared[flags]
