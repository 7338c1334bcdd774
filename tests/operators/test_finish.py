"""Finish: detokenized text, token counts, finish reasons, row-level errors and provenance."""

from __future__ import annotations

import pyarrow as pa
import pytest

from model.tokenizer import Tokenizer
from operators import columns as C
from operators.finish import Finish

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
