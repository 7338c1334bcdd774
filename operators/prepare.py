"""CPU stage: input rows -> prompt token ids and preprocessed image pixels, with per-row errors.

`Prepare(tokenizer, image_processor, tasks, ...)` is a callable over one Arrow batch with the
columns UNIT, ROW, ID and (when the job reads them) TEXT (bytes) and IMAGE (bytes). For every
task it fills the task's prompt-id column, or its error kind and message; for image tasks it
fills PIXELS once per row (shared by every task of the row). Nothing here raises for a bad row:

  text null -> text_missing; not UTF-8 -> text_invalid_utf8; empty/whitespace -> text_empty;
  literal image markers in the text -> prompt_images;
  prompt over max_input_tokens -> text_too_long (long_input = "error"), or the text is cut
  at a token boundary until the prompt fits (long_input = "truncate"); a text far longer than
  the limit (megabytes) is judged on its head alone, so it is never tokenized whole;
  image null -> image_missing; unreadable / not allowed / too many pixels -> the ImageError kind;
  the row's file lacks the text (image) column or holds it with an unusable type -> the kind and
  message that the read stage put in TEXT_ERROR (IMAGE_ERROR) and their message columns
  ("column_missing" / "column_type"; see the schema-drift policy in pipeline/inputs.py). These
  optional columns are present only in blocks of such files;
  the row's id appeared earlier in the input -> ID_ERROR ("duplicate_id") in every task, with its
  message naming the first occurrence; nothing else of the row is looked at.

Not here: Ray scheduling (pipeline/build.py), reading files (pipeline/inputs.py), generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from model.images import ImageError, ImageProcessor
from model.tokenizer import BOI_TOKEN, PromptError, Tokenizer

from . import columns as C


@dataclass(frozen=True)
class PromptTask:
    """What prepare needs to know about one task."""

    output_column: str  # names the task's columns
    template: str  # format string with {text}, {image}, {source_language}, {target_language}
    constants: dict = field(default_factory=dict)  # fixed template fields (languages)
    uses_text: bool = True  # the template has {text}
    uses_image: bool = False  # the template has {image}


# Characters a prompt keeps per allowed token before longer texts are cut (truncate) or judged on
# their head alone (error): far more than any real token covers.
_CHARS_PER_TOKEN = 16


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
    ):
        if long_input not in ("error", "truncate"):
            raise ValueError(f"long_input must be 'error' or 'truncate', got {long_input!r}")
        if any(t.uses_image for t in tasks) and image_processor is None:
            raise ValueError("an image task needs an image processor")
        self.tokenizer = tokenizer
        self.images = image_processor
        self.tasks = list(tasks)
        self.max_input_tokens = max_input_tokens
        self.long_input = long_input
        self.needs_text = any(t.uses_text for t in self.tasks)
        self.needs_image = any(t.uses_image for t in self.tasks)

    @staticmethod
    def required_columns(tasks: list[PromptTask]) -> list[str]:
        """The columns a batch must have: the unit, row and id, and the text / image the tasks read."""
        return ([C.UNIT, C.ROW, C.ID] + [C.TEXT] * any(t.uses_text for t in tasks)
                + [C.IMAGE] * any(t.uses_image for t in tasks))

    # ---- one batch ---------------------------------------------------------------------------

    def __call__(self, batch: pa.Table) -> pa.Table:
        C.require(batch, self.required_columns(self.tasks), "prepare")
        n = batch.num_rows
        texts = batch.column(C.TEXT).to_pylist() if self.needs_text else [None] * n
        images = batch.column(C.IMAGE).to_pylist() if self.needs_image else [None] * n
        text_problems = _column_problems(batch, C.TEXT_ERROR, C.TEXT_ERROR_MESSAGE)
        image_problems = _column_problems(batch, C.IMAGE_ERROR, C.IMAGE_ERROR_MESSAGE)
        id_problems = _column_problems(batch, C.ID_ERROR, C.ID_ERROR_MESSAGE)

        pixels: list[bytes | None] = [None] * n
        per_task: dict[str, tuple[list, list, list]] = {t.output_column: ([], [], []) for t in self.tasks}
        for r in range(n):
            if id_problems[r] is not None:  # a duplicate: every task fails the same way, nothing is decoded
                for ids_col, kind_col, msg_col in per_task.values():
                    ids_col.append(None)
                    kind_col.append(id_problems[r].kind)
                    msg_col.append(id_problems[r].message)
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
                ids_col, kind_col, msg_col = per_task[task.output_column]
                error = (text_error if task.uses_text else None) or (image_error if task.uses_image else None)
                ids = None
                if error is None:
                    try:
                        ids = self._prompt_ids(task, text)
                    except _RowError as exc:
                        error = exc
                ids_col.append(ids)
                kind_col.append(error.kind if error else None)
                msg_col.append(error.message if error else None)

        out = {C.UNIT: batch.column(C.UNIT), C.ROW: batch.column(C.ROW), C.ID: batch.column(C.ID)}
        if self.needs_image:
            out[C.PIXELS] = pa.array(pixels, type=pa.binary())
        for task in self.tasks:
            cols = C.TaskColumns.of(task.output_column)
            ids_col, kind_col, msg_col = per_task[task.output_column]
            out[cols.prompt_ids] = pa.array(ids_col, type=pa.list_(pa.int32()))
            out[cols.error_kind] = pa.array(kind_col, type=pa.string())
            out[cols.error_message] = pa.array(msg_col, type=pa.string())
        return pa.table(out)

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

    def _render(self, task: PromptTask, text: str | None) -> list[int]:
        values = dict(task.constants)
        if task.uses_text:
            values["text"] = text
        if task.uses_image:
            values["image"] = BOI_TOKEN
        prompt = task.template.format(**values)
        try:
            return self.tokenizer.encode_prompt(prompt, num_images=1 if task.uses_image else 0)
        except PromptError as exc:
            raise _RowError(exc.kind, f"{exc}") from None

    def _prompt_ids(self, task: PromptTask, text: str | None) -> list[int]:
        limit = self.max_input_tokens
        if task.uses_text and len(text) > limit * _CHARS_PER_TOKEN:
            # No token covers more than a few dozen characters in practice: cut absurdly long texts
            # before tokenizing them whole (a megabyte text would take hundreds of MB as token ids).
            head = text[: limit * _CHARS_PER_TOKEN]
            if self.long_input == "truncate":
                text = head  # the exact cut is made below, at a token boundary
            else:
                ids = self._render(task, head)
                if len(ids) > 2 * limit:  # far over even before the rest: the whole prompt is too
                    raise _RowError(
                        "text_too_long",
                        f"the prompt is more than input.max_input_tokens = {limit} tokens (the first {len(head)} of "
                        f"the text's {len(text)} characters already give {len(ids)}); set input.long_input = "
                        f"\"truncate\" to cut such texts, or raise max_input_tokens",
                    )
        ids = self._render(task, text)
        if len(ids) <= limit:
            return ids
        if self.long_input == "error" or not task.uses_text:
            raise _RowError(
                "text_too_long",
                f"the prompt is {len(ids)} tokens, more than input.max_input_tokens = {limit}; set "
                f"input.long_input = \"truncate\" to cut such texts, or raise max_input_tokens",
            )
        text_ids = self.tokenizer.encode_one(text, add_bos=False)
        keep = len(text_ids) - (len(ids) - limit)
        for _ in range(8):  # re-tokenizing the cut text can merge differently at the seam
            if keep <= 0:
                break
            cut = self.tokenizer.decode_one(text_ids[:keep], skip_special_tokens=False)
            ids = self._render(task, cut)
            if len(ids) <= limit:
                return ids
            keep -= max(1, len(ids) - limit)
        raise _RowError(
            "text_too_long",
            f"the prompt template alone leaves no room for text within input.max_input_tokens = {limit}; "
            f"raise max_input_tokens or shorten the prompt",
        )
