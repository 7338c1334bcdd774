"""Prepare: prompts, tokens, images and one error kind per kind of bad row, with the real tiny
checkpoint's SentencePiece tokenizer and image processor."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from helpers.pipeline_data import IMAGE_SIZE, bomb_png, image_bytes
from model.images import ImageProcessor
from model.tokenizer import Tokenizer
from operators import columns as C
from operators.prepare import Prepare, PromptTask

SUMMARIZE = PromptTask("summary", "Summarize: {text}\nSummary:", uses_text=True)
TRANSLATE = PromptTask("fr", "From {source_language} to {target_language}: {text}",
                       constants={"source_language": "English", "target_language": "French"}, uses_text=True)
CAPTION = PromptTask("caption", "{image} Caption this image.", uses_text=False, uses_image=True)


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return Tokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def images(tiny_checkpoint):
    return ImageProcessor.from_pretrained(tiny_checkpoint)


def batch(texts=None, imgs=None, text_type=None):
    text_type = text_type or pa.binary()
    n = len(texts if texts is not None else imgs)
    cols = {C.UNIT: pa.array(["u"] * n), C.ROW: pa.array(range(n), type=pa.int64()),
            C.ID: pa.array([f"r{i}" for i in range(n)])}
    if texts is not None:
        cols[C.TEXT] = pa.array(texts, type=text_type)
    if imgs is not None:
        cols[C.IMAGE] = pa.array(imgs, type=pa.binary())
    return pa.table(cols)


def task_view(out: pa.Table, name: str):
    cols = C.TaskColumns.of(name)
    return (out.column(cols.prompt_ids).to_pylist(), out.column(cols.error_kind).to_pylist(),
            out.column(cols.error_message).to_pylist())


def test_text_rows_and_their_errors(tok):
    prep = Prepare(tok, None, [SUMMARIZE, TRANSLATE], max_input_tokens=64)
    texts = [b"The weather is nice.", None, b"", b" \n ", b"caf\xc3(", b"x <image_soft_token> y", b"word " * 200]
    out = prep(batch(texts))
    ids, kinds, messages = task_view(out, "summary")
    assert kinds == [None, "text_missing", "text_empty", "text_empty", "text_invalid_utf8", "prompt_images",
                     "text_too_long"]
    assert ids[0][0] == tok.bos_id and tok.decode_one(ids[0]) == "Summarize: The weather is nice.\nSummary:"
    assert all(i is None for i in ids[1:]) and all(m for m in messages[1:]) and messages[0] is None
    assert "input.long_input" in messages[6]
    fr_ids, fr_kinds, _ = task_view(out, "fr")
    assert fr_kinds == kinds and tok.decode_one(fr_ids[0]) == "From English to French: The weather is nice."
    assert out.column(C.ID).to_pylist() == [f"r{i}" for i in range(7)] and C.PIXELS not in out.column_names


def test_string_columns_work_too(tok):
    out = Prepare(tok, None, [SUMMARIZE], max_input_tokens=64)(batch(["ok text", None], text_type=pa.string()))
    assert task_view(out, "summary")[1] == [None, "text_missing"]


def test_truncate_cuts_the_text_not_the_template(tok):
    prep = Prepare(tok, None, [SUMMARIZE], max_input_tokens=40, long_input="truncate")
    long = "The quick brown fox jumps over the lazy dog. " * 40
    ids, kinds, _ = task_view(prep(batch([long.encode(), b"short"])), "summary")
    assert kinds == [None, None] and len(ids[0]) <= 40 and len(ids[0]) >= 30
    text = tok.decode_one(ids[0])
    assert text.startswith("Summarize: The quick brown fox") and text.endswith("\nSummary:")
    tiny = Prepare(tok, None, [PromptTask("s", "A very long instruction that never ends at all, really. {text}")],
                   max_input_tokens=8, long_input="truncate")
    assert task_view(tiny(batch([b"hello"])), "s")[1] == ["text_too_long"]


def test_images_and_their_errors(tok, images):
    good = image_bytes("PNG", size=(50, 20))
    jpeg = image_bytes("JPEG", size=(64, 64))
    imgs = [good, None, b"", jpeg[: len(jpeg) // 2], b"\x00garbage" * 20, bomb_png(), image_bytes("PPM")]
    prep = Prepare(tok, images, [CAPTION, SUMMARIZE], max_input_tokens=64)
    out = prep(batch([b"some text"] * len(imgs), imgs))
    ids, kinds, _ = task_view(out, "caption")
    assert kinds == [None, "image_missing", "image_decode", "image_decode", "image_decode", "image_too_large",
                     "image_format"]
    assert ids[0].count(tok.image_id) == tok.mm_tokens_per_image and ids[0].count(tok.boi_id) == 1
    assert task_view(out, "summary")[1] == [None] * len(imgs)  # a bad image does not fail the text task
    pixels = out.column(C.PIXELS).to_pylist()
    assert pixels[1:] == [None] * 6
    array = np.frombuffer(pixels[0], dtype=np.uint8).reshape(3, IMAGE_SIZE, IMAGE_SIZE)  # resized, not normalized
    assert np.array_equal(array, images.resize(good).numpy())


def test_missing_input_column_is_a_bug_not_a_row_error(tok):
    with pytest.raises(KeyError, match="prepare needs columns"):
        Prepare(tok, None, [SUMMARIZE], max_input_tokens=64)(batch(imgs=[b"x"]))
