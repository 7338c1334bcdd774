"""CPU stage: input rows -> prompt token ids and preprocessed image pixels, with per-row errors.

`Prepare(tokenizer, image_processor, tasks, ...)` is a callable over one Arrow batch with the
columns UNIT, ROW, ID and (when the job reads them) TEXT (bytes), IMAGE (bytes), the FIELD columns
of prompt template fields and prompt_column (UTF-8 bytes), the LABELS columns of labels_column
(list<string>) and the KEEP columns of output.keep_columns (passed through untouched). For every
task it fills the task's prompt-id column, or its error kind and message; a classify task also its
candidates (each label's token ids, no EOS) and labels (the label strings); for image tasks it
fills PIXELS once per row (shared by every task of the row). Nothing here raises for a bad row:

  text null -> text_missing; not UTF-8 -> text_invalid_utf8; empty/whitespace -> text_empty;
  literal image markers in the text (or a field, or the prompt column) -> prompt_images;
  a template field's column null -> field_missing (not UTF-8: text_invalid_utf8; an empty value is
  fine: it is a part of the prompt); prompt_column null -> prompt_missing, empty or whitespace ->
  prompt_empty; a labels_column null -> labels_missing, an empty list -> labels_empty, a null,
  empty, repeated or over-long label (MAX_LABEL_TOKENS) or more than MAX_LABELS labels ->
  labels_invalid;
  prompt over max_input_tokens -> text_too_long (long_input = "error"), or (long_input =
  "truncate") the {text} (else the prompt column's value) is cut at a token boundary until the
  prompt fits; a prompt with neither is text_too_long either way. A value far longer than the limit
  (megabytes) is judged on its head alone, so it is never tokenized whole;
  with long_input = "chunk" (generating tasks with {text}, no image) the {text} of a prompt over
  the limit is split into pieces whose prompts fit (operators/chunking.py): the row's prompt ids
  stay null and it carries, in the task's chunk columns, each piece's prompt ids and the prompt's
  frame (the ids around {text}, and the separator) from which infer builds the prompts that join
  the pieces' outputs; a text needing more than chunking.MAX_CHUNKS pieces, or a template that
  leaves no room for text, is text_too_long;
  image null -> image_missing; unreadable / not allowed / too many pixels -> the ImageError kind;
  the row's file lacks a column the task reads or holds it with an unusable type -> the kind and
  message that the read stage put beside it (columns.read_error_columns: "column_missing" /
  "column_type"; see the schema-drift policy in pipeline/inputs.py). These optional columns are
  present only in blocks of such files;
  the row's id appeared earlier in the input -> ID_ERROR ("duplicate_id") in every task, with its
  message naming the first occurrence; nothing else of the row is looked at.

Not here: Ray scheduling (pipeline/build.py), reading files (pipeline/inputs.py), generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from model.images import ImageError, ImageProcessor
from model.tokenizer import BOI_TOKEN, PromptError, Tokenizer

from . import chunking
from . import columns as C


@dataclass(frozen=True)
class PromptTask:
    """What prepare needs to know about one task."""

    output_column: str  # names the task's columns
    template: str | None  # format string ({text}, {image}, constants, fields, {labels}); None with prompt_column
    constants: dict = field(default_factory=dict)  # fixed template fields (languages)
    uses_text: bool = True  # the template has {text}
    uses_image: bool = False  # the template has {image}
    fields: tuple[str, ...] = ()  # input columns the template's other fields name (their FIELD columns)
    prompt_column: str | None = None  # each row's whole prompt comes from this input column (its FIELD column)
    classify: bool = False  # a classify task: candidates and labels too
    labels: tuple[str, ...] | None = None  # classify: the same candidates for every row
    labels_column: str | None = None  # classify: each row's candidates, from this input column (its LABELS column)

    def __post_init__(self):
        if (self.template is None) == (self.prompt_column is None):
            raise ValueError(f"task {self.output_column}: give a template or a prompt_column, not both or neither")
        if self.classify and (self.labels is None) == (self.labels_column is None):
            raise ValueError(f"task {self.output_column}: a classify task takes labels or labels_column, exactly one")

    def read_columns(self) -> list[str]:
        """The internal input columns this task reads beyond TEXT and IMAGE."""
        names = [C.field_column(f) for f in self.fields]
        if self.prompt_column:
            names.append(C.field_column(self.prompt_column))
        if self.labels_column:
            names.append(C.labels_column(self.labels_column))
        return names


# Characters a prompt keeps per allowed token before longer texts are cut (truncate) or judged on
# their head alone (error): far more than any real token covers.
_CHARS_PER_TOKEN = 16
MAX_LABELS = 1024  # candidates per row at most: each is a decoder row of the scoring pass
MAX_LABEL_TOKENS = 256  # tokens per candidate at most
_PROMPT_KEY = "_row_prompt"  # the template key a prompt_column's value is rendered under (not a field name)
_LABELS_KEY = "labels"  # a classify template's field for the row's candidates


@dataclass(frozen=True)
class Chunked:
    """A row's long text in pieces (long_input = "chunk")."""

    prompts: list[list[int]]  # each piece's prompt ids: the frame around the piece
    frame: chunking.Frame  # the prompt around {text}, for the prompts that join the pieces' outputs


_TEXT_MARK = "\x00{text}\x00"  # stands for {text} when a template is rendered around it (no text holds a NUL pair)


class _RowError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def _column_problems(batch: pa.Table, kind_column: str, message_column: str) -> list[_RowError | None]:
    """Per row, the error the read stage attached to it (a column its file lacks, a duplicate id), or None."""
    if kind_column not in batch.column_names:
        return [None] * batch.num_rows
    kinds = batch.column(kind_column).to_pylist()
    messages = batch.column(message_column).to_pylist()
    return [None if kind is None else _RowError(kind, message) for kind, message in zip(kinds, messages)]


class Prepare:
    """Prompt templates, tokenization and safe image decoding for a batch of rows."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor | None,
        tasks: list[PromptTask],
        max_input_tokens: int,
        long_input: str = "error",
        keep: tuple[str, ...] = (),
    ):
        """`keep`: the job's output.keep_columns, whose KEEP columns pass through."""
        if long_input not in ("error", "truncate", "chunk"):
            raise ValueError(f"long_input must be 'error', 'truncate' or 'chunk', got {long_input!r}")
        if long_input == "chunk":
            for t in tasks:
                if t.classify or not t.uses_text or t.uses_image or t.prompt_column:
                    raise ValueError(f"task {t.output_column}: long_input = 'chunk' takes generating tasks whose "
                                     f"template has {{text}} and no {{image}}")
        if any(t.uses_image for t in tasks) and image_processor is None:
            raise ValueError("an image task needs an image processor")
        self.tokenizer = tokenizer
        self.images = image_processor
        self.tasks = list(tasks)
        self.max_input_tokens = max_input_tokens
        self.long_input = long_input
        self.keep = tuple(keep)
        self.needs_text = any(t.uses_text for t in self.tasks)
        self.needs_image = any(t.uses_image for t in self.tasks)
        # between two outputs joined into one prompt (long_input = "chunk")
        self.separator = tuple(tokenizer.encode_one(chunking.SEPARATOR, add_bos=False)) if long_input == "chunk" else ()
        # Fixed labels are tokenized once: (labels, their ids, or the error every row then gets).
        self.fixed_labels = {t.output_column: self._candidates(list(t.labels)) for t in self.tasks
                             if t.classify and t.labels is not None}

    @staticmethod
    def required_columns(tasks: list[PromptTask], keep: tuple[str, ...] = ()) -> list[str]:
        """The columns a batch must have: the unit, row and id, the text / image / other input columns the
        tasks read, and the keep columns."""
        extra = list(dict.fromkeys(name for t in tasks for name in t.read_columns()))
        return ([C.UNIT, C.ROW, C.ID] + [C.TEXT] * any(t.uses_text for t in tasks)
                + [C.IMAGE] * any(t.uses_image for t in tasks) + extra + [C.keep_column(k) for k in keep])

    # ---- one batch ---------------------------------------------------------------------------

    def __call__(self, batch: pa.Table) -> pa.Table:
        C.require(batch, self.required_columns(self.tasks, self.keep), "prepare")
        n = batch.num_rows
        texts = batch.column(C.TEXT).to_pylist() if self.needs_text else [None] * n
        images = batch.column(C.IMAGE).to_pylist() if self.needs_image else [None] * n
        text_problems = _column_problems(batch, C.TEXT_ERROR, C.TEXT_ERROR_MESSAGE)
        image_problems = _column_problems(batch, C.IMAGE_ERROR, C.IMAGE_ERROR_MESSAGE)
        id_problems = _column_problems(batch, C.ID_ERROR, C.ID_ERROR_MESSAGE)
        # The other input columns the tasks read: internal name -> (values, per-row read problems).
        inputs = {name: (batch.column(name).to_pylist(), _column_problems(batch, *C.read_error_columns(name)))
                  for t in self.tasks for name in t.read_columns()}

        pixels: list[bytes | None] = [None] * n
        per_task: dict[str, tuple[list, ...]] = {t.output_column: ([], [], [], [], []) for t in self.tasks}
        chunked: dict[str, list[Chunked | None]] = {t.output_column: [None] * n for t in self.tasks}
        for r in range(n):
            if id_problems[r] is not None:  # a duplicate: every task fails the same way, nothing is decoded
                for ids_col, kind_col, msg_col, cand_col, label_col in per_task.values():
                    ids_col.append(None)
                    kind_col.append(id_problems[r].kind)
                    msg_col.append(id_problems[r].message)
                    cand_col.append(None)
                    label_col.append(None)
                continue
            text, text_error = (None, None)
            if self.needs_text:
                text, text_error = (None, text_problems[r]) if text_problems[r] else self._text(texts[r])
            image_error = image_problems[r]
            if self.needs_image and image_error is None:
                try:
                    pixels[r] = self._pixels(images[r])
                except _RowError as exc:
                    image_error = exc
            for task in self.tasks:
                ids_col, kind_col, msg_col, cand_col, label_col = per_task[task.output_column]
                error = (text_error if task.uses_text else None) or (image_error if task.uses_image else None)
                ids = candidates = labels = None
                if error is None:
                    try:
                        ids, candidates, labels = self._task_row(task, r, text, inputs)
                    except _RowError as exc:
                        error = exc
                if isinstance(ids, Chunked):
                    chunked[task.output_column][r], ids = ids, None
                ids_col.append(ids)
                kind_col.append(error.kind if error else None)
                msg_col.append(error.message if error else None)
                cand_col.append(candidates if error is None else None)
                label_col.append(labels if error is None else None)

        out = C.row_columns(batch)
        for name in self.keep:
            out[C.keep_column(name)] = batch.column(C.keep_column(name))
        if self.needs_image:
            out[C.PIXELS] = pa.array(pixels, type=pa.binary())
        for task in self.tasks:
            cols = C.TaskColumns.of(task.output_column)
            ids_col, kind_col, msg_col, cand_col, label_col = per_task[task.output_column]
            out[cols.prompt_ids] = pa.array(ids_col, type=pa.list_(pa.int32()))
            out[cols.error_kind] = pa.array(kind_col, type=pa.string())
            out[cols.error_message] = pa.array(msg_col, type=pa.string())
            if task.classify:
                out[cols.candidates] = pa.array(cand_col, type=pa.list_(pa.list_(pa.int32())))
                out[cols.labels] = pa.array(label_col, type=pa.list_(pa.string()))
            if self.long_input == "chunk":
                pieces = chunked[task.output_column]
                out[cols.chunk_prompts] = pa.array([p.prompts if p else None for p in pieces],
                                                   type=pa.list_(pa.list_(pa.int32())))
                out[cols.chunk_frame] = pa.array([p.frame.to_row() if p else None for p in pieces],
                                                 type=C.CHUNK_FRAME_TYPE)
        return pa.table(out)

    # ---- one task of one row -------------------------------------------------------------------

    def _task_row(self, task: PromptTask, r: int, text: str | None,
                  inputs: dict) -> tuple[list[int], list[list[int]] | None, list[str] | None]:
        """(prompt ids, candidates' ids, labels) of row r for `task`; _RowError when the row cannot give them."""
        values = dict(task.constants)
        if task.uses_text:
            values["text"] = text
        if task.uses_image:
            values["image"] = BOI_TOKEN
        for name in task.fields:
            values[name] = self._field(inputs, C.field_column(name), r, name)
        template, cut = task.template, "text" if task.uses_text else None
        if task.prompt_column:
            value = self._field(inputs, C.field_column(task.prompt_column), r, None, task.prompt_column)
            if not value.strip():
                raise _RowError("prompt_empty", f"the prompt (prompt_column {task.prompt_column!r}) is "
                                                f"{'empty' if not value else 'only whitespace'}")
            template, cut = "{" + _PROMPT_KEY + "}", _PROMPT_KEY
            values[_PROMPT_KEY] = value
        candidates = labels = None
        if task.classify:
            if task.labels is not None:
                labels, candidates, error = self.fixed_labels[task.output_column]
                if error is not None:
                    raise error
            else:
                labels, candidates = self._row_labels(inputs, task.labels_column, r)
            values[_LABELS_KEY] = ", ".join(labels)
        ids = self._prompt_ids(template, values, cut, 1 if task.uses_image else 0)
        return ids, candidates, labels

    @staticmethod
    def _field(inputs: dict, internal: str, r: int, field_name: str | None, prompt_column: str | None = None) -> str:
        """The text of a template field (field_name) or of the prompt column (prompt_column) in row r."""
        values, problems = inputs[internal]
        if problems[r] is not None:
            raise problems[r]
        column = field_name or prompt_column
        value = values[r]
        if value is None:
            if prompt_column:
                raise _RowError("prompt_missing", f"the prompt (prompt_column {prompt_column!r}) is null")
            raise _RowError("field_missing", f"the prompt field {{{field_name}}} (input column {column!r}) is null")
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _RowError("text_invalid_utf8", f"input column {column!r} is not valid UTF-8 ({exc.reason} at byte "
                                                 f"{exc.start})") from None

    def _row_labels(self, inputs: dict, column: str, r: int) -> tuple[list[str], list[list[int]]]:
        values, problems = inputs[C.labels_column(column)]
        if problems[r] is not None:
            raise problems[r]
        labels = values[r]
        if labels is None:
            raise _RowError("labels_missing", f"the row's labels (labels_column {column!r}) are null")
        if not labels:
            raise _RowError("labels_empty", f"the row's labels (labels_column {column!r}) are an empty list")
        labels, candidates, error = self._candidates(labels, f" (labels_column {column!r})")
        if error is not None:
            raise error
        return labels, candidates

    def _candidates(self, labels: list, where: str = "") -> tuple[list[str], list[list[int]] | None, _RowError | None]:
        """Labels -> (labels, each one's token ids, None), or (labels, None, the labels_invalid error)."""
        def invalid(message: str):
            return labels, None, _RowError("labels_invalid", f"{message}{where}")

        if len(labels) > MAX_LABELS:
            return invalid(f"the row has {len(labels)} labels, more than {MAX_LABELS}")
        for n, label in enumerate(labels):
            if label is None or not label.strip():
                return invalid(f"label {n} is {'null' if label is None else repr(label)}; every label must be text")
        seen: set[str] = set()
        repeated = sorted({label for label in labels if label in seen or seen.add(label)})
        if repeated:
            return invalid(f"the labels repeat {', '.join(map(repr, repeated))}; list each label once")
        ids = self.tokenizer.encode(list(labels), add_bos=False)
        for label, tokens in zip(labels, ids):
            if len(tokens) > MAX_LABEL_TOKENS:
                return invalid(f"label {label[:40]!r} is {len(tokens)} tokens, more than {MAX_LABEL_TOKENS}")
        return list(labels), ids, None

    # ---- pieces ------------------------------------------------------------------------------

    @staticmethod
    def _text(value) -> tuple[str | None, _RowError | None]:
        if value is None:
            return None, _RowError("text_missing", "the text is null")
        if isinstance(value, str):
            text = value
        else:
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                return None, _RowError(
                    "text_invalid_utf8", f"the text is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                )
        if not text.strip():
            return None, _RowError("text_empty", "the text is empty" if not text else "the text is only whitespace")
        return text, None

    def _pixels(self, value) -> bytes:
        if value is None:
            raise _RowError("image_missing", "the image is null (or a {bytes, path} struct without bytes)")
        try:
            tensor = self.images.resize(value)  # uint8: infer rescales and normalizes on the device
        except ImageError as exc:
            raise _RowError(exc.kind, str(exc)) from None
        return C.pixels_to_bytes(tensor.numpy())

    def _render(self, template: str, values: dict, images: int) -> list[int]:
        prompt = template.format(**values)
        try:
            return self.tokenizer.encode_prompt(prompt, num_images=images)
        except PromptError as exc:
            raise _RowError(exc.kind, f"{exc}") from None

    def _chunked(self, template: str, values: dict) -> Chunked:
        """The row's {text} in pieces whose prompts (the template around each piece) fit max_input_tokens."""
        limit, text = self.max_input_tokens, values["text"]
        if len(text) > chunking.MAX_CHUNKS * limit * _CHARS_PER_TOKEN:  # judged before tokenizing it whole
            raise _RowError("text_too_long", f"the text ({len(text)} characters) is far more than "
                                             f"{chunking.MAX_CHUNKS} pieces of input.max_input_tokens = {limit} tokens "
                                             f"(long_input = \"chunk\"); raise max_input_tokens or shorten the text")
        around = template.format(**{**values, "text": _TEXT_MARK}).split(_TEXT_MARK)
        if len(around) != 2:
            raise _RowError("text_too_long", "the prompt template names {text} more than once, so long_input = "
                                             "\"chunk\" cannot put one piece in it; name it once")
        try:
            prefix = self.tokenizer.encode_prompt(around[0], 0) if around[0] else [self.tokenizer.bos_id]
            suffix = self.tokenizer.encode_prompt(around[1], 0, add_bos=False) if around[1] else []
            units = chunking.text_units(text)
            unit_ids = self.tokenizer.encode_prompts([u for u, _ in units], add_bos=False)
        except PromptError as exc:
            raise _RowError(exc.kind, f"{exc}") from None
        budget = limit - len(prefix) - len(suffix)
        if budget < 1:
            raise _RowError("text_too_long", f"the prompt template alone leaves no room for text within "
                                             f"input.max_input_tokens = {limit}; raise max_input_tokens or shorten "
                                             f"the prompt")
        pieces = chunking.split_pieces(unit_ids, [level for _, level in units], budget, self._continues_char)
        if len(pieces) > chunking.MAX_CHUNKS:
            raise _RowError("text_too_long", f"the text needs {len(pieces)} pieces of at most {budget} tokens "
                                             f"(input.max_input_tokens = {limit} less the prompt template), more "
                                             f"than {chunking.MAX_CHUNKS}; raise max_input_tokens or shorten the text")
        frame = chunking.Frame(tuple(prefix), self.separator, tuple(suffix), limit)
        if len(pieces) == 1:  # over the limit as one string, within it unit by unit (tokens at the seams)
            return frame.wrap(pieces)
        return Chunked([frame.wrap([piece]) for piece in pieces], frame)

    def _continues_char(self, token_id: int) -> bool:
        """Whether a token is a byte-fallback piece <0x80>..<0xBF>: the middle or end of a UTF-8 character."""
        piece = self.tokenizer.id_to_piece(token_id)
        return (len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
                and 0x80 <= int(piece[3:5], 16) < 0xC0)

    def _prompt_ids(self, template: str, values: dict, cut: str | None, images: int) -> list[int] | Chunked:
        """The prompt's ids within max_input_tokens; `cut` is the value long_input = "truncate" may cut.
        With long_input = "chunk", a prompt over the limit comes back as the pieces of its {text}."""
        limit = self.max_input_tokens
        longest = limit * _CHARS_PER_TOKEN
        if self.long_input == "chunk":
            if len(values["text"]) <= longest:
                ids = self._render(template, values, images)
                if len(ids) <= limit:
                    return ids
            return self._chunked(template, values)
        if cut is not None and self.long_input == "truncate" and len(values[cut]) > longest:
            values = {**values, cut: values[cut][:longest]}  # the exact cut is made below, at a token boundary
        heads = {k: v[:longest] if isinstance(v, str) else v for k, v in values.items()}
        if heads != values:
            # No token covers more than a few dozen characters in practice: judge absurdly long values by
            # their heads before tokenizing them whole (a megabyte text would take hundreds of MB as ids).
            ids = self._render(template, heads, images)
            if len(ids) > 2 * limit:  # far over even before the rest: the whole prompt is too
                key = max((k for k, v in values.items() if isinstance(v, str)), key=lambda k: len(values[k]))
                what = {"text": "the text's", _PROMPT_KEY: "the prompt's"}.get(key, f"the field {{{key}}}'s")
                raise _RowError(
                    "text_too_long",
                    f"the prompt is more than input.max_input_tokens = {limit} tokens (the first {longest} of "
                    f"{what} {len(values[key])} characters already give {len(ids)}); set input.long_input = "
                    f"\"truncate\" to cut such texts, or raise max_input_tokens",
                )
        ids = self._render(template, values, images)
        if len(ids) <= limit:
            return ids
        if self.long_input == "error" or cut is None:
            fix = ("set input.long_input = \"truncate\" to cut such texts, or raise max_input_tokens"
                   if self.long_input == "error" else
                   "the task's prompt has no {text} and no prompt_column for long_input = \"truncate\" to cut; "
                   "raise max_input_tokens")
            raise _RowError("text_too_long", f"the prompt is {len(ids)} tokens, more than input.max_input_tokens = "
                                             f"{limit}; {fix}")
        text = values[cut]
        text_ids = self.tokenizer.encode_one(text, add_bos=False)
        keep = len(text_ids) - (len(ids) - limit)
        for _ in range(8):  # re-tokenizing the cut text can merge differently at the seam
            if keep <= 0:
                break
            shorter = self.tokenizer.decode_one(text_ids[:keep], skip_special_tokens=False)
            ids = self._render(template, {**values, cut: shorter}, images)
            if len(ids) <= limit:
                return ids
            keep -= max(1, len(ids) - limit)
        raise _RowError(
            "text_too_long",
            f"the prompt template alone leaves no room for text within input.max_input_tokens = {limit}; "
            f"raise max_input_tokens or shorten the prompt",
        )
