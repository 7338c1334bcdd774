"""Column names, the output Arrow schema and the per-row error kinds, in one place.

Every stage reads and writes the columns named here, so the names are spelled once. The output
of a job has, per input row:

  id                       the input id (or a deterministic one derived from file and row)
  error_kind, error_message the row's first task error (null when every task succeeded)
  per task, with OUT its output_column:
    OUT                    generated text (null when the task failed for this row)
    OUT_input_tokens       prompt tokens the model saw (after truncation, images included)
    OUT_output_tokens      generated tokens (EOS included)
    OUT_finish_reason      "eos" | "length" (null on error)
    OUT_error_kind         one of ERROR_KINDS (null when fine)
    OUT_error_message      what went wrong, for a person (null when fine)
  model_source, model_revision, run_config_hash   provenance of the result
  input_file, input_row    provenance of the row: the input file's URI and the row's number in it

Internal columns (prefixed "__") carry work between stages and are dropped before writing.

Not here: how columns are filled (prepare.py, infer.py, finish.py), or written (pipeline/).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

ID = "id"
ERROR_KIND = "error_kind"
ERROR_MESSAGE = "error_message"
MODEL_SOURCE = "model_source"
MODEL_REVISION = "model_revision"
RUN_CONFIG_HASH = "run_config_hash"
INPUT_FILE = "input_file"
INPUT_ROW = "input_row"

# Internal columns between stages.
UNIT = "__unit"  # key of the unit of work (input file + row range) the row belongs to
ROW = "__row"  # row number inside its input file
TEXT = "__text"  # input text as bytes (validated and decoded in prepare)
IMAGE = "__image"  # encoded image bytes
PIXELS = "__pixels"  # resized uint8 image as pixels_to_bytes gives it (null when none)
# Present only in blocks read from a file whose text (image) column is missing or of an unusable
# type (schema drift across input files): the error kind and message every row of that file gets
# for the tasks that read the column; prepare turns them into task errors.
TEXT_ERROR = "__text_error"  # "column_missing" | "column_type"
TEXT_ERROR_MESSAGE = "__text_error_message"
IMAGE_ERROR = "__image_error"
IMAGE_ERROR_MESSAGE = "__image_error_message"
# Present only in blocks of a unit that holds rows whose id appeared earlier in the input: DUPLICATE_ID
# (and a message naming the first occurrence) on those rows, null on the others.
ID_ERROR = "__id_error"
ID_ERROR_MESSAGE = "__id_error_message"
INTERNAL_PREFIX = "__"


def require(batch: pa.Table, names: list[str], stage: str) -> None:
    """Fail loudly when a stage gets a batch without the columns it reads (a plan wired wrong)."""
    missing = [c for c in names if c not in batch.column_names]
    if missing:
        raise KeyError(f"{stage} needs columns {missing}; got {batch.column_names}")


def pixels_to_bytes(pixels: np.ndarray) -> bytes:
    """A resized image [C, S, S] as it travels in PIXELS between prepare and infer: uint8 (rescale and
    normalize happen on the model's device), C order, no header (its shape is the checkpoint's, known
    to both sides)."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"PIXELS carries uint8 pixels (ImageProcessor.resize), got {pixels.dtype}")
    return np.ascontiguousarray(pixels).tobytes()


def pixels_from_bytes(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of pixels_to_bytes: a writable uint8 array of `shape` ([C, S, S])."""
    return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()

# Every error kind a row can carry, with its meaning: the one vocabulary of the project. Input
# problems are found when a file is read (column_*, duplicate_id) or on CPU in prepare; model
# problems in infer. A test (tests/operators/test_error_kinds.py) finds every kind the code can
# produce and checks it is here and in the README.
ERROR_KINDS: dict[str, str] = {
    "duplicate_id": "the row's id appeared earlier in the input (the message names where); the row is not computed",
    "column_missing": "the row's file lacks the task's text or image column (other files have it)",
    "column_type": "the row's file has that column with a type that cannot hold text or image bytes",
    "text_missing": "the text is null",
    "text_empty": "the text is empty or only whitespace",
    "text_invalid_utf8": "the text bytes are not valid UTF-8",
    "text_too_long": "the prompt is longer than input.max_input_tokens and long_input = \"error\"",
    "prompt_images": "the text holds literal image markers that would claim image slots",
    "image_missing": "the image is null (or a {bytes, path} struct without bytes)",
    "image_decode": "the image bytes are empty, truncated, corrupt or of no known format",
    "image_format": "the image is in a format outside the allowlist",
    "image_too_large": "the image has more pixels than allowed (a possible decompression bomb)",
    "invalid_request": "the model refused the request (a bug upstream if it ever shows)",
    "out_of_memory": "the request alone does not fit in device memory",
    "model_error": "any other failure inside generation for this row (the message keeps the exception)",
}
DUPLICATE_ID = "duplicate_id"
COLUMN_MISSING = "column_missing"
COLUMN_TYPE = "column_type"


@dataclass(frozen=True)
class TaskColumns:
    """The output columns of one task."""

    text: str  # generated text
    input_tokens: str  # prompt tokens
    output_tokens: str  # generated tokens
    finish_reason: str  # "eos" | "length"
    error_kind: str  # error kind or null
    error_message: str  # error message or null
    # internal, between stages:
    prompt_ids: str  # list<int32> prompt ids from prepare (null on error)
    output_ids: str  # list<int32> generated ids from infer (null on error)

    @classmethod
    def of(cls, output_column: str) -> TaskColumns:
        return cls(
            text=output_column,
            input_tokens=f"{output_column}_input_tokens",
            output_tokens=f"{output_column}_output_tokens",
            finish_reason=f"{output_column}_finish_reason",
            error_kind=f"{output_column}_error_kind",
            error_message=f"{output_column}_error_message",
            prompt_ids=f"__{output_column}_prompt_ids",
            output_ids=f"__{output_column}_output_ids",
        )

    def output_fields(self) -> list[pa.Field]:
        return [
            pa.field(self.text, pa.string()),
            pa.field(self.input_tokens, pa.int32()),
            pa.field(self.output_tokens, pa.int32()),
            pa.field(self.finish_reason, pa.string()),
            pa.field(self.error_kind, pa.string()),
            pa.field(self.error_message, pa.string()),
        ]


RESERVED = frozenset({ID, ERROR_KIND, ERROR_MESSAGE, MODEL_SOURCE, MODEL_REVISION, RUN_CONFIG_HASH, INPUT_FILE,
                      INPUT_ROW})


def reserved_names(output_column: str) -> list[str]:
    """All output column names a task with this output_column would create."""
    cols = TaskColumns.of(output_column)
    return [f.name for f in cols.output_fields()]


def output_schema(output_columns: list[str], id_type: pa.DataType) -> pa.Schema:
    """The schema of every output file of a job: id, row error, per-task columns, provenance."""
    fields = [pa.field(ID, id_type), pa.field(ERROR_KIND, pa.string()), pa.field(ERROR_MESSAGE, pa.string())]
    for name in output_columns:
        fields.extend(TaskColumns.of(name).output_fields())
    fields += [
        pa.field(MODEL_SOURCE, pa.string()),
        pa.field(MODEL_REVISION, pa.string()),
        pa.field(RUN_CONFIG_HASH, pa.string()),
        pa.field(INPUT_FILE, pa.string()),
        pa.field(INPUT_ROW, pa.int64()),
    ]
    return pa.schema(fields)
