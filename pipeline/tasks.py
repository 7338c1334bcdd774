"""The task kinds a job can run: the presets caption, summarize, translate; generate; classify.

Each task kind has a default prompt template (generate has none), a default output column and its
own generation defaults; a job's [[task]] table may override any of them. Templates are Python
format strings. The presets fill fixed fields:

  {text}              the row's text, from input.text_column (summarize, translate; caption may use it too)
  {image}             where the row's image goes, from input.image_column (becomes the tokenizer's image marker)
  {source_language}   translate only
  {target_language}   translate only

generate and classify templates are open: besides {text} and {image} (the same columns as above),
every other field names an input column, read as text ({title}, {question}, {year}: string or
binary UTF-8 columns, numbers and booleans written as text); classify also fills {labels} with the
row's candidate labels joined by ", " (in a generate template {labels} is a column like any other).

Literal braces are written {{ and }}. Templates are checked when the job is loaded: an unknown
field of a preset, a missing {text} or {image}, or a translate task without its languages fails
early.

Not here: parsing the job file (spec.py), tokenizing prompts (operators/prepare.py), scoring
labels (model/score.py).
"""

from __future__ import annotations

import dataclasses
import string
import types
import typing
from dataclasses import dataclass, field

from model.generate import GenerationParams

# GenerationParams fields a [[task]] table may not set: token ids are the checkpoint's.
_NOT_SETTABLE = frozenset({"eos_token_ids"})


def _generation_fields() -> dict[str, type | tuple[type, ...]]:
    """The GenerationParams fields a [[task]] may set, with the TOML value types each accepts (an
    integer where a float is asked is fine), read off GenerationParams itself."""
    hints = typing.get_type_hints(GenerationParams)
    fields = {}
    for f in dataclasses.fields(GenerationParams):
        if f.name in _NOT_SETTABLE:
            continue
        hint = hints[f.name]
        if isinstance(hint, types.UnionType):  # `int | None`: None means "not set", as an absent key does
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        fields[f.name] = (int, float) if hint is float else hint
    return fields


GENERATION_FIELDS: dict[str, type | tuple[type, ...]] = _generation_fields()


@dataclass(frozen=True)
class TaskKind:
    """What a task kind needs and what it does by default."""

    name: str  # caption | summarize | translate | generate | classify
    template: str | None  # default prompt template (None: the job must give prompt or prompt_column)
    output_column: str  # default output column
    required_fields: frozenset[str]  # template fields that must appear
    allowed_fields: frozenset[str]  # template fields that may appear (open kinds: besides input columns)
    generation: dict = field(default_factory=dict)  # the kind's defaults for GenerationParams fields
    open_fields: bool = False  # any other field names an input column (generate, classify)
    classify: bool = False  # scores candidate labels instead of generating text


# Fields an open template fills itself; every other field is an input column.
TEXT_FIELD, IMAGE_FIELD, LABELS_FIELD = "text", "image", "labels"


TASK_KINDS: dict[str, TaskKind] = {
    "caption": TaskKind(
        name="caption",
        template="{image} Describe this image in one sentence.",
        output_column="caption",
        required_fields=frozenset({"image"}),
        allowed_fields=frozenset({"image", "text"}),
        generation={"max_new_tokens": 64},
    ),
    "summarize": TaskKind(
        name="summarize",
        template="Summarize the following text in a few sentences.\n\n{text}\n\nSummary:",
        output_column="summary",
        required_fields=frozenset({"text"}),
        allowed_fields=frozenset({"text"}),
        generation={"max_new_tokens": 128},
    ),
    "translate": TaskKind(
        name="translate",
        template="Translate the following text from {source_language} to {target_language}.\n\n{text}\n\n"
                 "{target_language}:",
        output_column="translation",
        required_fields=frozenset({"text"}),
        allowed_fields=frozenset({"text", "source_language", "target_language"}),
        generation={"max_new_tokens": 256},
    ),
    "generate": TaskKind(
        name="generate",
        template=None,
        output_column="output",
        required_fields=frozenset(),
        allowed_fields=frozenset({TEXT_FIELD, IMAGE_FIELD}),
        generation={"max_new_tokens": 128},
        open_fields=True,
    ),
    "classify": TaskKind(
        name="classify",
        template="Classify the following text as one of: {labels}.\n\n{text}\n\nAnswer:",
        output_column="label",
        required_fields=frozenset(),
        allowed_fields=frozenset({TEXT_FIELD, IMAGE_FIELD, LABELS_FIELD}),
        open_fields=True,
        classify=True,
    ),
}


def template_fields(template: str) -> set[str]:
    """Field names a format string uses; ValueError when it is malformed."""
    names = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or not name.isidentifier():
            raise ValueError(f"placeholder {{{name}}} is not a name; use {{text}}, {{image}}, ... "
                             f"(write {{{{ for a brace)")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} has a format spec or conversion; write just {{{name}}}")
        names.add(name)
    return names


def check_template(kind: TaskKind, template: str) -> set[str]:
    """The fields of `template`, checked against what `kind` allows and needs."""
    try:
        names = template_fields(template)
    except ValueError as exc:
        raise ValueError(f"prompt template is malformed: {exc}") from exc
    unknown = set() if kind.open_fields else names - kind.allowed_fields
    if unknown:
        raise ValueError(
            f"prompt uses {', '.join('{' + n + '}' for n in sorted(unknown))}, which a {kind.name} task does not "
            f"fill; it may use {', '.join('{' + n + '}' for n in sorted(kind.allowed_fields))}"
        )
    missing = kind.required_fields - names
    if missing:
        raise ValueError(
            f"prompt lacks {', '.join('{' + n + '}' for n in sorted(missing))}: a {kind.name} prompt must say where "
            f"the row's {' and '.join(sorted(missing))} go"
        )
    return names


def column_fields(kind: TaskKind, names: set[str]) -> tuple[str, ...]:
    """The template fields of an open kind that name input columns (not {text}, {image}, {labels})."""
    if not kind.open_fields:
        return ()
    return tuple(sorted(names - kind.allowed_fields))
