"""Validation: every check a job passes before any GPU work, in the driver, with the fix in each error.

`validate(spec)` checks the checkpoint (config.json, weights present, tokenizer.model or
tokenizer.json, image settings; the settings it ignores are logged as warnings), that
input.max_input_tokens is within its context (max_position_embeddings), the LoRA adapter
of model.adapter against it (its files' identity goes into the run config), the input files'
footers, and the output path (a probe object written and deleted; a directory that holds another
job's outputs is refused; one that the input paths reach is refused), and returns a Validated:
the files, the units of work, the output id type and store, and what the run report and the plan
need. Inputs: each column a task reads (text, image, the fields of its prompt template,
prompt_column, labels_column) must be usable in at least one file, and the id column and every
output.keep_columns column in every file with types that cast to one; a file whose task column is
missing or unusable (schema drift) does not fail the job: its rows get column_missing /
column_type errors (policy in inputs.py), and validation warns about it. With an id column, ids
that repeat are found (inputs.find_duplicate_ids): duplicate_id error rows, or a JobError with
input.unique_ids. A translate task whose target_language the language detector does not know
(operators/quality.py) is warned about: its outputs get no wrong_language flag.

Not here: running the job (run.py), parsing the job file (spec.py).
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, replace

import fsspec
import pyarrow as pa

from operators import columns as C

from .commit import MANIFEST, PART_PREFIX, OutputStore
from .inputs import (
    COLUMN_TYPE,
    ExtraColumn,
    InputFile,
    Unit,
    column_problem,
    file_identity,
    find_duplicate_ids,
    id_output_type,
    id_transport_type,
    keep_output_type,
    list_inputs,
    make_units,
    read_footers,
)
from .paths import StorageError, family, open_fs
from .spec import JobError, JobSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Validated:
    """What validation learned: the units, the model facts, the store."""

    spec: JobSpec  # the job as parsed
    files: tuple[InputFile, ...]  # the input files, with footers and identities
    units: tuple[Unit, ...]  # every unit of work of the current input (done or not)
    id_type: pa.DataType  # the output's id column type
    model_revision: str | None  # the checkpoint's hub revision (provenance)
    run_hash: str  # hash of the run config: keys the units and the output directory
    store: OutputStore  # the output directory, probed writable
    weight_bytes: int  # size of the checkpoint's weight files
    drift: tuple[str, ...] = ()  # warnings: input files whose rows get column_missing / column_type errors
    duplicate_rows: int = 0  # rows whose id appeared earlier in the input (duplicate_id error rows)
    keep: tuple[pa.Field, ...] = ()  # output.keep_columns with their output types, in order
    extra: tuple[ExtraColumn, ...] = ()  # what the read stage reads besides id, text and image
    checkpoint: object = None  # model.CheckpointSummary: tokenizer file, generation_config, warnings, adapter

    @property
    def provenance(self) -> dict:
        return {C.MODEL_SOURCE: self.spec.model.source, C.MODEL_REVISION: self.model_revision,
                C.RUN_CONFIG_HASH: self.run_hash}

    @property
    def output_columns(self) -> list[str]:
        return [t.output_column for t in self.spec.tasks]

    @property
    def output_tasks(self) -> list[C.OutputTask]:
        return [t.output_task for t in self.spec.tasks]


def _check_model(spec: JobSpec):
    """The checkpoint's summary (model.inspect_checkpoint), or a JobError naming model.source and the fix."""
    from model.inspect import inspect_checkpoint
    from model.source import CheckpointError

    source = spec.model.source
    try:
        return inspect_checkpoint(source, spec.storage_options(source),
                                  needs_images=any(t.uses_image for t in spec.tasks))
    except (CheckpointError, ValueError, OSError) as exc:
        raise JobError(f"model.source {source!r} is not a usable checkpoint: {exc}") from exc


def _check_context(spec: JobSpec, config) -> None:
    """input.max_input_tokens within the encoder's context (config.json's max_position_embeddings):
    longer prompts run, but the model was never trained on positions past it."""
    context = config.encoder.max_position_embeddings
    if spec.input.max_input_tokens > context:
        chunk = ("; long_input = \"chunk\" then splits longer texts into pieces of at most that"
                 if spec.input.long_input == "chunk" else
                 "; for longer texts, set input.long_input = \"chunk\" (map-reduce) or \"truncate\"")
        raise JobError(f"input.max_input_tokens = {spec.input.max_input_tokens} is more than the context of "
                       f"model.source {spec.model.source!r} ({context} tokens, its config.json's "
                       f"max_position_embeddings); set max_input_tokens to at most {context}{chunk}")


def _check_adapter(spec: JobSpec, config) -> tuple[object, str]:
    """(the model.LoraAdapter of model.adapter, checked against the checkpoint's config, and its files'
    identity), or a JobError naming model.adapter and the fix."""
    from model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from model.source import CheckpointError
    from model.weights import inspect_adapter

    adapter = spec.model.adapter
    try:
        lora = inspect_adapter(adapter, config, spec.storage_options(adapter))
        src = lora.source
        identity = ";".join(f"{name}:{file_identity(src.fs.info(src.path(name)))}"
                            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    except (CheckpointError, ValueError, OSError) as exc:
        raise JobError(f"model.adapter {adapter!r} is not a usable LoRA adapter for model.source "
                       f"{spec.model.source!r}: {exc}") from exc
    return lora, identity + (f";revision={src.revision}" if src.revision else "")


def _check_ids(column: str | None, files: list[InputFile]) -> pa.DataType:
    """The output id type; every file must have the id column, its types cast losslessly to one."""
    if not column:
        return pa.string()  # derived ids (inputs.derived_ids)
    for f in files:
        if column not in f.schema.names:
            raise JobError(
                f"input.id_column {column!r} is not a column of {f.uri} (columns: {', '.join(f.schema.names)}); "
                f"every input file needs it, since an id must mean the same thing in every output row: add it to "
                f"that file, set input.id_column to a column all files have, or leave id_column out to derive ids"
            )
        t = f.schema.field(column).type
        if id_transport_type(t) is None:
            raise JobError(f"input.id_column {column!r} in {f.uri} has nested type {t}; use a string or integer id "
                           f"column, or leave id_column out to derive ids")
    types = [f.schema.field(column).type for f in files]
    try:
        return id_output_type(types)
    except ValueError:
        first = files[0]
        other = next(f for f in files if f.schema.field(column).type != types[0])
        raise JobError(
            f"input.id_column {column!r} is {types[0]} in {first.uri} but {other.schema.field(column).type} in "
            f"{other.uri}, which do not cast losslessly to one type (integers of any width but uint64 do, and "
            f"string with large_string); make the id type the same in every file"
        ) from None


def _check_column(role: str, column: str, files: list[InputFile], readers: list[str], setting: str = "",
                  fix: str = "") -> list[str]:
    """Fail the job when no file has a usable `role` column; else warnings about the files that lack one.

    Files without a usable column are schema drift, handled per row (inputs.py): their rows get
    error kind column_missing / column_type in the tasks that read the column (`readers`). `setting`
    names the column in messages, `fix` says how to point it elsewhere.
    """
    setting = setting or f"input.{role}_column"
    fix = fix or f"set {setting} to"
    problems = [(f, column_problem(f.uri, f.schema, role, column, setting)) for f in files]
    bad = [(f, p) for f, p in problems if p is not None]
    if len(bad) == len(files):
        typed = [p for _, p in bad if p.kind == COLUMN_TYPE]
        if typed:
            raise JobError(f"no input file has a usable {setting}: {typed[0].message}")
        first, names = files[0].uri, ", ".join(files[0].schema.names)
        close = difflib.get_close_matches(column, sorted({n for f in files for n in f.schema.names}), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if len(files) == 1:
            raise JobError(f"{setting} {column!r} is not a column of {first} (columns: {names}); {fix} one of "
                           f"them{hint}")
        raise JobError(f"{setting} {column!r} is not a column of any of the {len(files)} input files; {fix} a "
                       f"column they have (e.g. {first} has: {names}){hint}")
    if not bad or not readers:
        return []  # a column no task reads is never read, whatever the files hold
    rows = sum(f.num_rows for f, _ in bad)
    kinds = sorted({p.kind for _, p in bad})
    shown = "; ".join(p.message for _, p in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
    return [(f"{setting} {column!r}: {len(bad)} of {len(files)} input files cannot provide it, so their {rows} rows "
             f"get error kind {' / '.join(kinds)} in {', '.join(readers)} ({shown})")]


def _check_inputs(spec: JobSpec) -> tuple[list[InputFile], pa.DataType, list[str]]:
    """The input files, the output id type, and warnings about schema drift (handled per row)."""
    inp = spec.input
    options = spec.storage_options(inp.paths[0])
    try:
        files = read_footers(list_inputs(inp.paths, options), options)
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    id_type = _check_ids(inp.id_column, files)
    drift = []
    for role, column in (("text", inp.text_column), ("image", inp.image_column)):
        if column:
            readers = [t.output_column for t in spec.tasks if (t.uses_text if role == "text" else t.uses_image)]
            drift += _check_column(role, column, files, readers)
    for (column, role), (setting, fix, readers) in _task_columns(spec).items():
        drift += _check_column(role, column, files, readers, setting, fix)
    return files, id_type, drift


def _task_columns(spec: JobSpec) -> dict[tuple[str, str], tuple[str, str, list[str]]]:
    """(column, role) -> (how messages name it, the fix, the tasks reading it) for every input column
    the tasks read beyond text and image: template fields, prompt_column ("field"), labels_column."""
    found: dict[tuple[str, str], tuple[str, str, list[str]]] = {}
    for n, task in enumerate(spec.tasks):
        for column, role in task.input_columns().items():
            if role == "labels":
                setting, fix = f"task[{n}].labels_column", f"set task[{n}].labels_column to"
            elif column == task.prompt_column:
                setting, fix = f"task[{n}].prompt_column", f"set task[{n}].prompt_column to"
            else:
                setting = f"task[{n}].prompt field"
                fix = f"fix task[{n}].prompt (fields name input columns; {{{{ and }}}} write a brace) to use"
            entry = found.setdefault((column, role), (setting, fix, []))
            entry[2].append(task.output_column)
    return found


def _check_keep(spec: JobSpec, files: list[InputFile]) -> tuple[pa.Field, ...]:
    """output.keep_columns with their output types: every file must have each, with types that unify."""
    fields = []
    for name in spec.output.keep_columns:
        for f in files:
            if name not in f.schema.names:
                raise JobError(f"output.keep_columns names {name!r}, which is not a column of {f.uri} (columns: "
                               f"{', '.join(f.schema.names)}); every input file needs it, since it is copied into "
                               f"every output row: add it to that file or remove it from keep_columns")
        try:
            fields.append(pa.field(name, keep_output_type([f.schema.field(name).type for f in files])))
        except ValueError as exc:
            raise JobError(f"output.keep_columns {name!r} has no one type across the input files: {exc}; make its "
                           f"type the same in every file, or remove it from keep_columns") from None
    return tuple(fields)


def _read_columns(spec: JobSpec, keep: tuple[pa.Field, ...]) -> tuple[ExtraColumn, ...]:
    """The columns the read stage reads besides id, text and image."""
    extra = [ExtraColumn(column, role, setting=setting)
             for (column, role), (setting, _, _) in _task_columns(spec).items()]
    return tuple(extra) + tuple(ExtraColumn(f.name, "keep", f.type) for f in keep)


def _check_output(spec: JobSpec, store: OutputStore, run_hash: str) -> None:
    try:
        store.probe()
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    manifest = store.read_json(MANIFEST)
    if manifest is None:
        if store.parts():
            raise JobError(f"output.path {spec.output.path!r} already holds part files of an unknown job; choose an "
                           f"empty output path")
        return
    if manifest.get("run_config_hash") != run_hash:
        old, new = manifest.get("run_config", {}), spec.run_config()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise JobError(
            f"output.path {spec.output.path!r} holds the output of a job with different settings (changed: "
            f"{', '.join(changed) or 'format'}); resuming would mix the two. Use a new output.path for these "
            f"settings, or restore the old ones to resume"
        )


def _check_output_outside_inputs(spec: JobSpec, store: OutputStore, files: list[InputFile]) -> None:
    """Refuse an output directory that the input paths reach: each run would read its own part files
    as input and add their rows again. Checked on the paths as written (a directory that holds the
    output, a glob that would match its part files) and on the files listed (one under the output)."""
    root = store.root.rstrip("/")
    out_family = family(store.fs)
    part = f"{root}/{PART_PREFIX}{'0' * 32}.parquet"  # what the output's part files look like

    def refuse(path: str) -> JobError:
        return JobError(
            f"output.path {spec.output.path!r} is inside input.path {path!r}: every run would read its own output as "
            f"input and add its rows again. Choose an output.path outside the input, or narrow input.path to a "
            f"glob (such as .../*.parquet) that does not reach the output's part files")

    for path in spec.input.paths:
        fs, p = open_fs(path, spec.storage_options(path))
        if family(fs) != out_family:
            continue
        p = p.rstrip("/")
        if any(ch in p for ch in "*?["):
            if re.match(fsspec.utils.glob_translate(p), part):
                raise refuse(path)
        elif root == p or root.startswith(p + "/"):
            raise refuse(path)
    for f in files:
        fs, p = open_fs(f.uri, spec.storage_options(f.uri))
        if family(fs) == out_family and p.startswith(root + "/"):
            raise refuse(f.uri)


def _check_duplicates(spec: JobSpec, files: list[InputFile]) -> dict:
    """Rows that repeat an earlier id (inputs.find_duplicate_ids); with input.unique_ids a JobError."""
    column = spec.input.id_column
    if not column:
        return {}  # derived ids are unique by construction
    try:
        found = find_duplicate_ids(files, column, spec.storage_options(spec.input.paths[0]))
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    rows = sum(len(marks) for marks in found.values())
    if not rows:
        return found
    examples = [f"{d.id!r} at {d.first_uri} row {d.first_row} and {uri} row {row}"
                for uri, marks in found.items() for row, d in sorted(marks.items())][:3]
    more = f"; and {rows - len(examples)} more" if rows > len(examples) else ""
    if spec.input.unique_ids:
        raise JobError(f"input.unique_ids = true, but {rows} row(s) repeat an earlier id of input.id_column "
                       f"{column!r}: {'; '.join(examples)}{more}. Make the ids unique, or set input.unique_ids = false "
                       f"to run with the later rows as duplicate_id error rows")
    log.warning(f"{rows} row(s) repeat an earlier id of input.id_column {column!r}; each becomes a duplicate_id "
                f"error row naming the first: {'; '.join(examples)}{more}")
    return found


def validate(spec: JobSpec) -> Validated:
    """Every check that needs no GPU; raises JobError with the fix.

    The returned Validated.spec is `spec` with what validation resolved: the adapter's identity.
    """
    checkpoint = _check_model(spec)
    _check_context(spec, checkpoint.config)
    if spec.model.adapter:
        lora, identity = _check_adapter(spec, checkpoint.config)
        spec = replace(spec, model=replace(spec.model, adapter_identity=identity))
        checkpoint = replace(checkpoint, adapter=lora)
    for warning in checkpoint.warnings:
        log.warning(f"model.source {spec.model.source!r}: {warning}")
    for task in spec.tasks:
        if task.kind == "translate" and task.checked_language is None:
            log.warning(f"task {task.output_column!r}: target_language {task.target_language!r} is not a language "
                        f"the language detector knows; its outputs get no wrong_language check")
    run_hash = spec.run_config_hash()
    files, id_type, drift = _check_inputs(spec)
    keep = _check_keep(spec, files)
    for warning in drift:
        log.warning(warning)
    try:
        store = OutputStore(spec.output.path, spec.storage_options(spec.output.path))
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    _check_output_outside_inputs(spec, store, files)
    _check_output(spec, store, run_hash)
    duplicates = _check_duplicates(spec, files)
    units = make_units(files, spec.output.rows_per_file, run_hash, duplicates)
    return Validated(spec=spec, files=tuple(files), units=tuple(units), id_type=id_type,
                     model_revision=checkpoint.revision, run_hash=run_hash, store=store,
                     weight_bytes=checkpoint.weight_bytes,
                     drift=tuple(drift), duplicate_rows=sum(len(m) for m in duplicates.values()),
                     keep=keep, extra=_read_columns(spec, keep), checkpoint=checkpoint)
