"""Column names, the output Arrow schema, the per-row error kinds and quality flags, in one place.

Every stage reads and writes the columns named here, so the names are spelled once. The output
of a job has, per input row:

  id                       the input id (or a deterministic one derived from file and row)
  KEEP...                  the job's output.keep_columns, copied from the input row (error rows too),
                           under their input names and with their input types
  error_kind, error_message the row's first task error (null when every task succeeded)
  per generating task (caption, summarize, translate, generate), with OUT its output_column:
    OUT                    generated text (null when the task failed for this row)
    OUT_input_tokens       prompt tokens the model saw (after truncation, images included)
    OUT_output_tokens      generated tokens (EOS included)
    OUT_finish_reason      "eos" | "length" (null on error)
    OUT_chunks             int32: pieces the text was split into (long_input = "chunk"), 1 when it was
                           not split (null on error)
    OUT_chunk_depth        int32: rounds of joining the pieces' outputs, 0 when not split (null on error)
    OUT_flags              list<string>: the output's QUALITY_FLAGS (empty when none; null on error)
    (with num_return_sequences = n > 1, OUT, OUT_output_tokens, OUT_finish_reason and OUT_flags are
     lists of the n sequences' values: the n best beams, best first, or the n samples, sample 0 first)
    OUT_error_kind         one of ERROR_KINDS (null when fine)
    OUT_error_message      what went wrong, for a person (null when fine)
  per classify task:
    OUT                    the chosen label: string (the most probable candidate), or with
                           multi_label list<string>: every candidate whose probability is at or
                           above the threshold, most probable first (may be empty); null on error
    OUT_scores             list<struct<label: string, score: double, probability: double>>, one
                           entry per candidate in the candidates' order: score is the candidate's
                           log-likelihood (tokens + EOS; summed, or per token with score = "mean"),
                           probability the softmax of the scores over the row's candidates
    OUT_input_tokens, OUT_error_kind, OUT_error_message   as above
  model_source, model_revision, run_config_hash   provenance of the result
  input_file, input_row    provenance of the row: the input file's URI and the row's number in it
  input_hash               a hash of everything in the input row that decides its result (its id
                           where the job has an id_column, text, image, prompt fields, labels, keep
                           columns); a rerun reuses the result of a row whose hash it finds

Internal columns (prefixed "__") carry work between stages and are dropped before writing: the
fixed ones below, and per input column a stage needs beyond id, text and image: FIELD_PREFIX +
name (a prompt template field or prompt_column, as UTF-8 bytes), LABELS_PREFIX + name (a
labels_column, list<large_string>) and KEEP_PREFIX + name (a keep column, its output type). A
column the read stage could not give from a row's file has its error kind and message beside it
(read_error_columns).

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
INPUT_HASH = "input_hash"  # what in the input row decided its result (inputs.row_hashes); kept by every stage

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
# On the first row of each model call's batch (null on the others): what that call did on its actor, as
# JSON (infer.Infer.engine_record: device, dtype, how it decoded, model seconds, tokens, slot-steps). The
# committer sums the records of a unit's rows into its done-marker and the run report's `engine`.
ENGINE = "__engine"
INTERNAL_PREFIX = "__"
FIELD_PREFIX = "__field:"  # + input column: a template field's (or prompt_column's) value as UTF-8 bytes
LABELS_PREFIX = "__labels:"  # + input column: a labels_column's per-row candidates
KEEP_PREFIX = "__keep:"  # + input column: a keep column, cast to its output type


def field_column(name: str) -> str:
    """The internal column carrying input column `name` for a prompt template field or prompt_column."""
    return FIELD_PREFIX + name


def labels_column(name: str) -> str:
    """The internal column carrying input column `name` as a classify task's per-row labels."""
    return LABELS_PREFIX + name


def keep_column(name: str) -> str:
    """The internal column carrying input column `name` to the output (output.keep_columns)."""
    return KEEP_PREFIX + name


def read_error_columns(internal: str) -> tuple[str, str]:
    """(kind, message) columns beside an internal input column, present only in blocks of a file that
    cannot give it (schema drift): TEXT -> (TEXT_ERROR, TEXT_ERROR_MESSAGE), and so on."""
    return f"{internal}_error", f"{internal}_error_message"


def row_columns(batch: pa.Table) -> dict[str, pa.ChunkedArray]:
    """The columns every stage passes on unchanged: the row's unit, row number and id, and its INPUT_HASH
    (the read stage always gives one; batches built by hand in operator tests may lack it); after the
    model, ENGINE."""
    names = [UNIT, ROW, ID] + [name for name in (INPUT_HASH, ENGINE) if name in batch.column_names]
    return {name: batch.column(name) for name in names}


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
    "column_missing": "the row's file lacks a column the task reads (other files have it)",
    "column_type": "the row's file has that column with a type the task cannot read (text, image bytes, labels)",
    "text_missing": "the text is null",
    "text_empty": "the text is empty or only whitespace",
    "text_invalid_utf8": "the text bytes are not valid UTF-8",
    "text_too_long": "the prompt is longer than input.max_input_tokens and long_input = \"error\"; with long_input = "
                     "\"chunk\": the text needs more than MAX_CHUNKS pieces, or its pieces' outputs cannot be joined "
                     "within max_input_tokens",
    "prompt_images": "the text holds literal image markers that would claim image slots",
    "field_missing": "a column the prompt template names (a field other than {text} and {image}) is null",
    "prompt_missing": "the row's prompt_column value is null",
    "prompt_empty": "the row's prompt_column value is empty or only whitespace",
    "labels_missing": "the row's labels_column value is null",
    "labels_empty": "the row's labels_column value is an empty list",
    "labels_invalid": "a label of the row is null, empty, repeated or too long, or the row has too many labels",
    "image_missing": "the image is null (or a {bytes, path} struct without bytes)",
    "image_decode": "the image bytes are empty, truncated, corrupt or of no known format",
    "image_format": "the image is in a format outside the allowlist",
    "image_too_large": "the image has more pixels than allowed (a possible decompression bomb)",
    "invalid_request": "the model refused the request (a bug upstream if it ever shows)",
    "out_of_memory": "the request alone does not fit in device memory",
    "model_error": "any other failure inside generation for this row (the message keeps the exception)",
}
DUPLICATE_ID = "duplicate_id"

# Every quality flag a generated output can carry (OUT_flags), with its meaning: cheap checks that
# mark outputs worth a look. A flag is not an error: the text is kept. operators/quality.py computes
# them (its constants hold the thresholds); tests/operators/test_quality.py checks the README lists
# exactly these.
QUALITY_FLAGS: dict[str, str] = {
    "empty": "the text is empty or only whitespace (special tokens dropped)",
    "max_new_tokens": "generation stopped at max_new_tokens (finish_reason \"length\"), not at EOS",
    "repetition": "a block of output tokens repeats back to back at least 3 times over at least 16 tokens: "
                  "a looping decode",
    "wrong_language": "translate: the language detector is confident the text is not in target_language "
                      "(checked on texts of at least 20 letters, for languages the detector knows)",
}
COLUMN_MISSING = "column_missing"
COLUMN_TYPE = "column_type"


# A split row's figures from infer to finish (TaskColumns.chunking): pieces, rounds of joining, and the
# prompt tokens of all its requests (every piece's and every join's).
CHUNKING_TYPE = pa.struct([("chunks", pa.int32()), ("depth", pa.int32()), ("input_tokens", pa.int64())])

# A split row's prompt frame from prepare to infer (operators/chunking.Frame): the prompt's ids before and
# after {text}, the ids between two joined outputs, and the longest prompt allowed (max_input_tokens).
CHUNK_FRAME_TYPE = pa.struct([("prefix", pa.list_(pa.int32())), ("separator", pa.list_(pa.int32())),
                              ("suffix", pa.list_(pa.int32())), ("limit", pa.int32())])

# A classify task's OUT_scores: every candidate of the row, in the candidates' order.
SCORES_TYPE = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64()), ("probability", pa.float64())]))


@dataclass(frozen=True)
class TaskColumns:
    """The columns of one task (output and internal)."""

    text: str  # generated text, or a classify task's chosen label(s)
    input_tokens: str  # prompt tokens
    output_tokens: str  # generated tokens
    finish_reason: str  # "eos" | "length"
    flags: str  # generating: the output's QUALITY_FLAGS
    error_kind: str  # error kind or null
    error_message: str  # error message or null
    scores: str  # classify: every candidate's score and probability
    # internal, between stages:
    prompt_ids: str  # list<int32> prompt ids from prepare (null on error)
    output_ids: str  # list<int32> generated ids from infer, list<list<int32>> for n sequences (null on error)
    candidates: str  # classify: list<list<int32>> each candidate's token ids (no EOS), from prepare
    labels: str  # classify: list<string> the candidates as text, from prepare
    candidate_scores: str  # classify: list<float64> each candidate's score, from infer
    # long_input = "chunk" (operators/chunking.py); only in such jobs' batches:
    chunks: str  # output: int32 pieces of the row's text (1: not split)
    chunk_depth: str  # output: int32 rounds of joining outputs (0: not split)
    chunk_prompts: str  # list<list<int32>> each piece's prompt ids, from prepare (null: not split)
    chunk_frame: str  # CHUNK_FRAME_TYPE: the ids around {text}, the separator and the limit, from prepare
    chunking: str  # struct<chunks, depth, input_tokens> of a split row, from infer (null: not split)

    @classmethod
    def of(cls, output_column: str) -> TaskColumns:
        return cls(
            text=output_column,
            input_tokens=f"{output_column}_input_tokens",
            output_tokens=f"{output_column}_output_tokens",
            finish_reason=f"{output_column}_finish_reason",
            flags=f"{output_column}_flags",
            error_kind=f"{output_column}_error_kind",
            error_message=f"{output_column}_error_message",
            scores=f"{output_column}_scores",
            prompt_ids=f"__{output_column}_prompt_ids",
            output_ids=f"__{output_column}_output_ids",
            candidates=f"__{output_column}_candidates",
            labels=f"__{output_column}_labels",
            candidate_scores=f"__{output_column}_candidate_scores",
            chunks=f"{output_column}_chunks",
            chunk_depth=f"{output_column}_chunk_depth",
            chunk_prompts=f"__{output_column}_chunk_prompts",
            chunk_frame=f"__{output_column}_chunk_frame",
            chunking=f"__{output_column}_chunking",
        )

    def output_fields(self, classify: bool = False, multi_label: bool = False, sequences: int = 1) -> list[pa.Field]:
        """The task's output columns: a generating task's (with `sequences` > 1 its text, output tokens,
        finish reasons and flags are lists), or a classify task's (see the module docstring)."""
        errors = [pa.field(self.error_kind, pa.string()), pa.field(self.error_message, pa.string())]
        if classify:
            return [pa.field(self.text, pa.list_(pa.string()) if multi_label else pa.string()),
                    pa.field(self.scores, SCORES_TYPE), pa.field(self.input_tokens, pa.int32()), *errors]
        many = (lambda t: pa.list_(t)) if sequences > 1 else (lambda t: t)  # noqa: E731
        return [
            pa.field(self.text, many(pa.string())),
            pa.field(self.input_tokens, pa.int32()),
            pa.field(self.output_tokens, many(pa.int32())),
            pa.field(self.finish_reason, many(pa.string())),
            pa.field(self.flags, many(pa.list_(pa.string()))),
            *errors,
            pa.field(self.chunks, pa.int32()),
            pa.field(self.chunk_depth, pa.int32()),
        ]


@dataclass(frozen=True)
class OutputTask:
    """What the output layout needs to know of one task."""

    name: str  # its output_column
    classify: bool = False  # a classify task (label and scores) rather than a generating one
    multi_label: bool = False  # classify: the label column is a list of labels
    sequences: int = 1  # generating: outputs per row (num_return_sequences); > 1 makes list columns

    @classmethod
    def of(cls, task: str | OutputTask) -> OutputTask:
        """A task given by its output column alone is a generating task."""
        return task if isinstance(task, OutputTask) else cls(task)

    def output_fields(self) -> list[pa.Field]:
        return TaskColumns.of(self.name).output_fields(self.classify, self.multi_label, self.sequences)


RESERVED = frozenset({ID, ERROR_KIND, ERROR_MESSAGE, MODEL_SOURCE, MODEL_REVISION, RUN_CONFIG_HASH, INPUT_FILE,
                      INPUT_ROW, INPUT_HASH})


def reserved_names(output_column: str, classify: bool = False) -> list[str]:
    """All output column names a task with this output_column would create."""
    return [f.name for f in TaskColumns.of(output_column).output_fields(classify)]


def output_schema(tasks: list[str | OutputTask], id_type: pa.DataType, keep: list[pa.Field] = ()) -> pa.Schema:
    """The schema of every output file of a job: id, keep columns, row error, per-task columns, provenance."""
    fields = [pa.field(ID, id_type), *keep, pa.field(ERROR_KIND, pa.string()), pa.field(ERROR_MESSAGE, pa.string())]
    for task in tasks:
        fields.extend(OutputTask.of(task).output_fields())
    fields += [
        pa.field(MODEL_SOURCE, pa.string()),
        pa.field(MODEL_REVISION, pa.string()),
        pa.field(RUN_CONFIG_HASH, pa.string()),
        pa.field(INPUT_FILE, pa.string()),
        pa.field(INPUT_ROW, pa.int64()),
        pa.field(INPUT_HASH, pa.string()),
    ]
    return pa.schema(fields)
