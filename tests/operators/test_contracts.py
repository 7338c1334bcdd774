"""The stages' contracts: each operator names the columns it reads, checks them on every batch, and
the plan's Stage descriptions carry the same lists."""

from __future__ import annotations

import pyarrow as pa
import pytest

from model.generate import GenerationParams
from model.tokenizer import Tokenizer
from operators import columns as C
from operators.finish import Finish
from operators.infer import Infer, InferTask
from operators.prepare import Prepare, PromptTask


def test_required_columns_follow_the_tasks():
    text = PromptTask(output_column="summary", template="{text}", uses_text=True)
    image = PromptTask(output_column="caption", template="{image}", uses_text=False, uses_image=True)
    assert Prepare.required_columns([text]) == [C.UNIT, C.ROW, C.ID, C.TEXT]
    assert Prepare.required_columns([text, image]) == [C.UNIT, C.ROW, C.ID, C.TEXT, C.IMAGE]
    tasks = [InferTask("summary", GenerationParams()), InferTask("caption", GenerationParams(), uses_image=True)]
    needed = Infer.required_columns(tasks)
    assert C.PIXELS in needed and C.TaskColumns.of("caption").prompt_ids in needed
    assert C.TaskColumns.of("summary").output_ids in Finish.required_columns(["summary"])


def test_a_batch_without_a_column_it_needs_is_refused_by_name(tiny_checkpoint):
    finish = Finish(Tokenizer.from_pretrained(str(tiny_checkpoint)), ["summary"],
                    {C.MODEL_SOURCE: "m", C.MODEL_REVISION: None, C.RUN_CONFIG_HASH: "h"})
    cols = C.TaskColumns.of("summary")
    batch = pa.table({C.UNIT: ["u"], C.ROW: [0], C.ID: ["a"], cols.prompt_ids: [[5]], cols.finish_reason: ["eos"],
                      cols.error_kind: [None], cols.error_message: [None]})  # no output ids
    with pytest.raises(KeyError, match=r"finish needs columns \['__summary_output_ids'\]"):
        finish(batch)
