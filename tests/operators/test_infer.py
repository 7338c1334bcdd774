"""Infer: one Generator call per batch, every task together; batch-invariant; errors per row; each call's
engine record."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

import model.weights
from helpers.generator_faults import fail_on_prompt
from helpers.pipeline_data import image_bytes
from model.generate import GenerationParams, Generator, Request
from model.images import ImageProcessor
from model.tokenizer import Tokenizer
from operators import columns as C
from operators.infer import Infer, InferTask
from operators.prepare import Prepare, PromptTask


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    m = model.weights.load_pretrained(tiny_checkpoint, dtype="float32")
    prep = Prepare(tok, ImageProcessor.from_pretrained(tiny_checkpoint),
                   [PromptTask("s", "Summarize: {text}"), PromptTask("c", "{image} Caption:", uses_text=False,
                                                                     uses_image=True)],
                   max_input_tokens=128)
    texts = [f"Document number {i} says {'many words ' * i}".encode() for i in range(7)] + [None]
    imgs = [image_bytes("PNG", size=(30 + i, 30), color=(20 * i, 50, 90)) for i in range(7)] + [b"bad"]
    n = len(texts)
    prepared = prep(pa.table({C.UNIT: ["u"] * n, C.ROW: pa.array(range(n), type=pa.int64()),
                              C.ID: [str(i) for i in range(n)], C.TEXT: pa.array(texts, type=pa.binary()),
                              C.IMAGE: pa.array(imgs, type=pa.binary())}))
    return tok, m, prepared, ImageProcessor.from_pretrained(tiny_checkpoint)


TASKS = [InferTask("s", GenerationParams(max_new_tokens=5)), InferTask("c", GenerationParams(max_new_tokens=4), True)]


def test_results_equal_single_requests_and_errors_pass_through(parts):
    tok, m, prepared, processor = parts
    infer = Infer("unused", "float32", "cpu", TASKS, max_batch_tokens=4096, model=m, image_processor=processor)
    out = infer(prepared)
    assert C.PIXELS not in out.column_names
    s, c = C.TaskColumns.of("s"), C.TaskColumns.of("c")
    assert out.column(s.error_kind).to_pylist()[-1] == "text_missing"
    assert out.column(c.error_kind).to_pylist()[-1] == "image_decode"
    assert out.column(s.output_ids).to_pylist()[-1] is None
    alone = Generator(m, max_batch_tokens=4096)
    for r, ids in enumerate(out.column(s.prompt_ids).to_pylist()[:-1]):
        want = alone.generate([Request(ids, params=TASKS[0].params)])[0]
        assert out.column(s.output_ids)[r].as_py() == want.token_ids
        assert out.column(s.finish_reason)[r].as_py() == want.finish_reason
    # Captions: prepare shipped uint8 pixels, finished on the device; the same tokens as float pixels
    # preprocessed on the CPU give.
    imgs = [image_bytes("PNG", size=(30 + i, 30), color=(20 * i, 50, 90)) for i in range(7)]
    for r, ids in enumerate(out.column(c.prompt_ids).to_pylist()[:-1]):
        pixels = processor.preprocess(imgs[r])[None]
        want = alone.generate([Request(ids, pixel_values=pixels, params=TASKS[1].params)])[0]
        assert out.column(c.output_ids)[r].as_py() == want.token_ids
    # Split into other batch sizes: same ids.
    halves = pa.concat_tables([infer(prepared.slice(0, 3)), infer(prepared.slice(3))])
    assert halves.column(s.output_ids).to_pylist() == out.column(s.output_ids).to_pylist()
    assert halves.column(c.output_ids).to_pylist() == out.column(c.output_ids).to_pylist()


def test_a_failing_request_fails_only_its_row(parts, monkeypatch):
    tok, m, prepared, _ = parts
    infer = Infer("unused", "float32", "cpu", TASKS[:1], max_batch_tokens=4096, model=m)
    poisoned = prepared.column(C.TaskColumns.of("s").prompt_ids)[2].as_py()
    fail_on_prompt(monkeypatch, infer.generator, poisoned)
    out = infer(prepared)
    kinds = out.column(C.TaskColumns.of("s").error_kind).to_pylist()
    assert kinds == [None, None, "model_error", None, None, None, None, "text_missing"]
    assert "kernel fault" in out.column(C.TaskColumns.of("s").error_message)[2].as_py()


def test_each_call_leaves_its_engine_record_on_its_first_row(parts):
    tok, m, prepared, processor = parts
    infer = Infer("unused", "float32", "cpu", TASKS, max_batch_tokens=4096, model=m, image_processor=processor)
    calls = [infer(prepared.slice(0, 3)), infer(prepared.slice(3))]
    for out in calls:
        records = out.column(C.ENGINE).to_pylist()
        assert all(r is None for r in records[1:])
        record = json.loads(records[0])
        produced = sum(len(ids) for task in ("s", "c")
                       for ids in out.column(C.TaskColumns.of(task).output_ids).to_pylist() if ids is not None)
        # This call's own counts (not the generator's running totals), and how it decoded.
        assert record["generated_tokens"] == produced > 0 and record["seconds"] > 0
        assert record["device"] == "cpu" and record["dtype"] == "float32"
        assert record["decode"] == ("compiled" if infer.generator.compile else "eager")
        assert record["compile_fallback"] is None and 0 < record["slot_tokens"] <= record["slot_steps"]
    assert sum(json.loads(out.column(C.ENGINE)[0].as_py())["generated_tokens"] for out in calls) \
        == infer.generator.stats.generated_tokens
