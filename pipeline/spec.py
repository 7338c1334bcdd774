"""A job file (TOML) parsed and validated into a frozen JobSpec.

`load_job(path_or_text, overrides=())` reads a job file, applies `--set key=value` overrides
(dotted keys: `resources.rows_per_call=7`, `task.0.max_new_tokens=32`, `task.max_new_tokens=32`
for every task, `storage.s3.endpoint_url=...`; values are TOML values, or strings when they do not
parse as one), and checks every field. Each problem is a `JobError` naming the field and the fix.
Only the file itself is checked here; whether the input columns, the model and the output path
are really usable is checked against storage by `pipeline.run.validate` before any GPU work.

Schema (README.md shows a whole job; jobs/examples/ holds commented ones):
  [model]      source (required), dtype = "bfloat16" | "float16" | "float32", adapter (a PEFT LoRA
               adapter directory, local or fsspec URI or hub id, merged into the weights at load)
  [input]      path (required; string or list; fsspec paths or globs), id_column, text_column,
               image_column, max_input_tokens (8192; at most the checkpoint's context, checked by
               validate.py), long_input = "error" | "truncate" | "chunk" (summarize and generate
               tasks whose prompt has {text}: a long text is summarized piece by piece, map-reduce),
               unique_ids (false: a repeated id is a duplicate_id error row; true: the job fails
               before any work)
  [output]     path (required), rows_per_file (10000), compression ("zstd"), keep_columns (input
               columns copied into every output row, error rows included)
  [[task]]     kind (caption | summarize | translate | generate | classify), output_column, prompt,
               source_language, target_language (translate), prompt_column (generate, classify: each
               row's prompt from a column, instead of a template), and generation settings
               (max_new_tokens, min_new_tokens, temperature, top_k, top_p, seed, num_beams,
               length_penalty; not for classify). classify only: labels (the same candidates for
               every row) or labels_column (a list<string> column of each row's candidates), score
               ("sum" | "mean"), multi_label (false), threshold (with multi_label, in [0, 1])
  [resources]  gpu_actors (1, or [min, max]), gpus_per_actor (1.0; fractions allowed; 0 = CPU),
               cpus_per_actor (1.0), rows_per_call (GPU text jobs 1024, else 256), max_batch_tokens (a cap on a
               batch's padded prompt tokens; unset: on a GPU free memory (within the actor's share of
               a shared card) and 256 rows set the decode batch; on CPU 65536 tokens),
               call_timeout_s (1800; seconds one model call may run before the hang guard stops its
               actor, which Ray restarts and retries the call, at most 3 times, then the job fails)
  [storage.P]  fsspec options for paths of protocol P (s3, gcs, ...); never credentials. S3 gets
               bounded retries and timeouts unless the job sets its own (S3_CONFIG_DEFAULTS)

A generate or classify template must name an input column ({text}, {image} or any column), unless
the task reads each row's prompt from prompt_column (or, classify, its labels from labels_column):
every row would otherwise get the same prompt. Whether the columns a job names exist in its input
files, and hold usable types, is checked by validate.py against the files' footers.

Not here: running the job (run.py), task templates (tasks.py).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.generate import GenerationParams
from model.score import SCORE_MODES
from operators import columns, quality

from .tasks import GENERATION_FIELDS, IMAGE_FIELD, TASK_KINDS, TEXT_FIELD, check_template, column_fields

DTYPES = ("bfloat16", "float16", "float32")
LONG_INPUT_POLICIES = ("error", "truncate", "chunk")
# Task kinds whose output can stand for their input, so that the outputs of a long text's pieces can be
# put through the same prompt again (map-reduce): long_input = "chunk" takes these only.
CHUNK_KINDS = ("summarize", "generate")
COMPRESSIONS = ("zstd", "snappy", "gzip", "lz4", "none")
# Bumped when the output layout or the meaning of a setting changes, so old outputs are not mixed in.
# 2: unit keys include the input file's identity; input_file and input_row columns.
# 3: OUT_flags columns (quality flags) for generating tasks.
FORMAT_VERSION = 3

# Option names that hold secrets. Credentials come from the standard chains (environment,
# ~/.aws, instance roles), never from a job file: job files are shared, logged and committed.
_CREDENTIAL_NAME = re.compile(
    r"^(key|secret|token|password|passwd|username|user|creds?|credentials?|anon_key)$|"
    r"secret|password|session_token|access_key|account_key|sas_token|client_secret|private_key|api_key|"
    r"credential",
    re.IGNORECASE,
)


# Bounded, explicit retries and timeouts for every S3 filesystem a job opens. They live here because
# JobSpec.storage_options() is where all of them get their options: the input listing and footers
# (driver), the input reads (Ray workers), the checkpoint (driver, prepare/finish tasks and model
# actors, through model.source) and the output commit (driver). Without them a call's retries come
# from layers nobody chose: botocore's "legacy" mode (5 attempts, no retry quota), or whatever
# AWS_MAX_ATTEMPTS / ~/.aws/config say on each machine, wrapped in s3fs's own repeats, and a store
# that stops answering holds the job for many minutes per call. With these (botocore Config keys,
# passed by s3fs as config_kwargs):
#   * "standard" retry mode: at most 8 attempts per call, exponential backoff with jitter (at most
#     20 s apart) on throttling (503 SlowDown), other 5xx answers, connection errors and timeouts;
#     its retry quota stops retrying early when a store keeps failing;
#   * s3fs repeats a call that still fails with SlowDown or a timeout up to 5 times (its fixed
#     `retries`; this s3fs takes no option for it), so one call makes at most 5 x 8 attempts;
#   * connect within 10 s; a connection that sends nothing for 30 s is dead (the read timeout is per
#     socket read, not per object, so large reads are not cut short);
#   * permission (403 AccessDenied), not-found and other client errors are never retried: a job
#     without write access fails at once, with the path and the fix (storage.OutputStore).
# A job's own [storage.s3] config_kwargs win, key by key ("retries" counts as one key, since
# botocore lets total_max_attempts override max_attempts). Other protocols keep their library's
# defaults.
S3_CONFIG_DEFAULTS = {
    "retries": {"total_max_attempts": 8, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 30,
}


class JobError(ValueError):
    """The job file (or its overrides) is not runnable; the message names the field and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    source: str  # hub id, local directory or fsspec URI of the checkpoint directory
    dtype: str  # weights and compute dtype on the device
    adapter: str | None = None  # PEFT LoRA adapter directory (local, fsspec URI or hub id) merged at load
    # the adapter's files as stored (size plus ETag or mtime, per file), filled in by validation:
    # a rewritten adapter at the same path is a different output
    adapter_identity: str | None = None


@dataclass(frozen=True)
class InputSpec:
    paths: tuple[str, ...]  # Parquet files or globs on any fsspec filesystem
    id_column: str | None  # unique row id column; None = derived from file and row number
    text_column: str | None  # text column (string or binary)
    image_column: str | None  # image column (binary, or {bytes, path} struct)
    max_input_tokens: int  # longest prompt (tokens, images included) the model is given
    long_input: str  # over max_input_tokens: "error" (row error), "truncate" (cut the text) or "chunk" (map-reduce)
    unique_ids: bool = False  # a repeated id fails the job before any work (else: duplicate_id error rows)


@dataclass(frozen=True)
class OutputSpec:
    path: str  # output directory (fsspec URI or local path), no trailing slash
    rows_per_file: int  # input rows per unit of work = per output file
    compression: str  # Parquet compression codec
    keep_columns: tuple[str, ...] = ()  # input columns copied into every output row (error rows too)


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # caption | summarize | translate | generate | classify
    output_column: str  # name of the generated-text (classify: chosen label) column
    prompt: str | None  # the prompt template (the kind's default unless overridden); None with prompt_column
    source_language: str | None  # translate only
    target_language: str | None  # translate only
    generation: GenerationParams | None  # how its requests are decoded: the kind's defaults, then the job's
    # values; None for classify, which generates nothing
    uses_text: bool  # the template has {text}
    uses_image: bool  # the template has {image}
    fields: tuple[str, ...] = ()  # input columns the template's other fields name (generate, classify)
    prompt_column: str | None = None  # input column holding each row's whole prompt (generate, classify)
    labels: tuple[str, ...] | None = None  # classify: the candidate labels of every row
    labels_column: str | None = None  # classify: input column (list<string>) of each row's candidates
    score: str | None = None  # classify: "sum" | "mean" of a candidate's token log-probabilities
    multi_label: bool = False  # classify: return every label at or above threshold, as a list
    threshold: float | None = None  # classify with multi_label: the probability a label needs

    @property
    def classify(self) -> bool:
        return self.kind == "classify"

    @property
    def output_task(self) -> columns.OutputTask:
        """What the output layout needs of this task (operators/columns.py)."""
        return columns.OutputTask(self.output_column, classify=self.classify, multi_label=self.multi_label,
                                  sequences=self.sequences)

    @property
    def checked_language(self) -> str | None:
        """translate: the language detector's code for target_language, which the outputs' wrong_language
        check compares with (operators/quality.py); None for other kinds and for a language the
        detector does not know (validation warns)."""
        return quality.detector_language(self.target_language) if self.kind == "translate" else None

    @property
    def sequences(self) -> int:
        """Outputs per row: num_return_sequences (1 for classify tasks)."""
        return self.generation.num_return_sequences if self.generation is not None else 1

    def input_columns(self) -> dict[str, str]:
        """Input columns this task reads beyond text and image: column -> what for ("field", "labels")."""
        read = {name: "field" for name in self.fields}
        if self.prompt_column:
            read[self.prompt_column] = "field"
        if self.labels_column:
            read[self.labels_column] = "labels"
        return read


# TaskSpec fields added after format 2 was fixed, with their defaults: left out of the run config at
# their defaults, so a job that does not use them keeps its run config hash (and its outputs).
_LATER_TASK_FIELDS = {"fields": (), "prompt_column": None, "labels": None, "labels_column": None, "score": None,
                      "multi_label": False, "threshold": None}
_LATER_GENERATION_FIELDS = {"num_return_sequences": 1}  # the same for GenerationParams fields


@dataclass(frozen=True)
class ResourcesSpec:
    min_actors: int  # inference actors at least
    max_actors: int  # inference actors at most (== min_actors for a fixed pool)
    gpus_per_actor: float  # GPUs reserved per actor; 0 runs the model on CPU
    cpus_per_actor: float  # CPUs reserved per actor
    rows_per_call: int  # rows handed to an actor per call
    max_batch_tokens: int | None  # a cap on a batch's padded prompt tokens (decode slots x width); None:
    # on a GPU free memory (within the actor's share of a shared card) sets the decode slots; on CPU 65536 tokens
    call_timeout_s: float  # a model call running longer is taken as hung: its actor is restarted


@dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    input: InputSpec
    output: OutputSpec
    tasks: tuple[TaskSpec, ...]
    resources: ResourcesSpec
    storage: dict = field(default_factory=dict)  # protocol -> fsspec options (no credentials)
    origin: str = "<text>"  # where the job came from, for messages

    def storage_options(self, path: str) -> dict:
        """fsspec options for `path`'s protocol (a copy; empty for local paths), with the bounded
        retries and timeouts of S3_CONFIG_DEFAULTS for S3 where [storage.s3] does not set its own."""
        return storage_options(self.storage, path)

    def run_config(self) -> dict:
        """Everything that decides the output rows' content and layout (no paths, no resources)."""
        tasks = []
        for t in self.tasks:
            task = asdict(t)
            for key, default in _LATER_TASK_FIELDS.items():
                if task[key] == default or (isinstance(default, tuple) and tuple(task[key]) == default):
                    del task[key]
            for key, default in _LATER_GENERATION_FIELDS.items():
                if task["generation"] is not None and task["generation"][key] == default:
                    del task["generation"][key]
            tasks.append(task)
        config = {
            "format_version": FORMAT_VERSION,
            "model": {"source": self.model.source, "dtype": self.model.dtype,
                      # only with an adapter, so that jobs without one keep their run config hash
                      **({"adapter": self.model.adapter, "adapter_identity": self.model.adapter_identity}
                         if self.model.adapter else {})},
            "input": {
                "id_column": self.input.id_column,
                "text_column": self.input.text_column,
                "image_column": self.input.image_column,
                "max_input_tokens": self.input.max_input_tokens,
                "long_input": self.input.long_input,
            },
            "rows_per_file": self.output.rows_per_file,
            "tasks": tasks,
        }
        if self.output.keep_columns:
            config["keep_columns"] = list(self.output.keep_columns)
        return config

    def run_config_hash(self) -> str:
        """Hash of the run's prompts, generation settings and layout: keys outputs and provenance."""
        text = json.dumps(self.run_config(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def storage_options(storage: dict, path: str) -> dict:
    """fsspec options for `path`'s protocol from [storage] tables (`storage`: protocol -> options), as
    JobSpec.storage_options gives them; also used where there is no job file (`t5g2 status`)."""
    protocol = protocol_of(path)
    aliases = {"s3a": "s3", "gs": "gcs", "abfs": "az", "abfss": "az"}
    family = aliases.get(protocol, protocol)
    options = copy.deepcopy(dict(storage.get(protocol) or storage.get(family, {})))
    if family == "s3":
        config = dict(options.get("config_kwargs") or {})
        for key, value in S3_CONFIG_DEFAULTS.items():
            config.setdefault(key, copy.deepcopy(value))
        options["config_kwargs"] = config
    return options


def protocol_of(path: str) -> str:
    if "://" in path:
        return path.split("://", 1)[0].lower()
    return "file"


# ---- loading -------------------------------------------------------------------------------


def load_job(path_or_text: str | os.PathLike, overrides: Sequence[str] = ()) -> JobSpec:
    """Parse, override and validate a job file (a path, or the TOML text itself)."""
    text, origin = _read(path_or_text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{origin} is not valid TOML: {exc}. Fix the syntax at that line") from exc
    for item in overrides:
        _apply_override(raw, item)
    return parse_job(raw, origin)


def _read(path_or_text) -> tuple[str, str]:
    """(TOML text, origin): a path is read; a string with a newline or a table header is the text."""
    if isinstance(path_or_text, str) and not Path(path_or_text).is_file() and (
        "\n" in path_or_text or "[" in path_or_text
    ):
        return path_or_text, "<job text>"
    if not isinstance(path_or_text, (str, os.PathLike)):
        raise JobError(f"load_job takes a path or TOML text, got {type(path_or_text).__name__}")
    path = Path(path_or_text)
    if not path.is_file():
        raise JobError(f"job file {str(path)!r} not found: pass the path of a TOML job file")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"cannot read job file {str(path)!r}: {exc}") from exc


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string: --set output.path=s3://bucket/out/


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise JobError(f"--set {item!r} must be key=value, e.g. --set resources.rows_per_call=64")
    key, value_text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise JobError(f"--set {item!r}: the key must be dotted names, e.g. task.0.max_new_tokens")
    value = _parse_value(value_text.strip())
    if parts[0] == "task":
        tasks = raw.get("task")
        if not isinstance(tasks, list) or not tasks:
            raise JobError(f"--set {key}: the job has no [[task]] tables to set it on")
        if len(parts) >= 3 and parts[1].isdigit():
            index = int(parts[1])
            if index >= len(tasks):
                raise JobError(f"--set {key}: there are only {len(tasks)} task(s), numbered from 0")
            targets, rest = [tasks[index]], parts[2:]
        elif len(parts) == 2:
            targets, rest = tasks, parts[1:]
        else:
            raise JobError(f"--set {key}: use task.N.field (N from 0) or task.field for every task")
        for target in targets:
            _set_path(target, rest, value, key)
        return
    _set_path(raw, parts, value, key)


def _set_path(table: dict, parts: list[str], value: Any, key: str) -> None:
    for part in parts[:-1]:
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            raise JobError(f"--set {key}: {part!r} is not a table")
        table = child
    table[parts[-1]] = value


# ---- validation ----------------------------------------------------------------------------

_SECTIONS = {"model", "input", "output", "task", "resources", "storage"}
_MODEL_KEYS = {"source", "dtype", "adapter"}
_INPUT_KEYS = {"path", "id_column", "text_column", "image_column", "max_input_tokens", "long_input", "unique_ids"}
_OUTPUT_KEYS = {"path", "rows_per_file", "compression", "keep_columns"}
_CLASSIFY_KEYS = {"labels", "labels_column", "score", "multi_label", "threshold"}
_TASK_KEYS = {"kind", "output_column", "prompt", "prompt_column", "source_language", "target_language",
              *_CLASSIFY_KEYS, *GENERATION_FIELDS}
_RESOURCE_KEYS = {"gpu_actors", "gpus_per_actor", "cpus_per_actor", "rows_per_call", "max_batch_tokens",
                  "call_timeout_s"}
DEFAULT_CALL_TIMEOUT_S = 1800.0  # half an hour: far above any sane call (rows_per_call rows on one GPU)


def _unknown(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise JobError(
                f"{where}.{key} is not a known setting; {hint}allowed in [{where}]: {', '.join(sorted(allowed))}"
            )


def _table(raw: dict, name: str, required: bool = True) -> dict:
    value = raw.get(name)
    if value is None:
        if required:
            raise JobError(f"the job has no [{name}] table; add one (see jobs/examples/*.toml)")
        return {}
    if not isinstance(value, dict):
        raise JobError(f"{name} must be a table ([{name}]), got {type(value).__name__}")
    return value


def _str(table: dict, key: str, where: str, default: Any = None, required: bool = False) -> Any:
    value = table.get(key, default)
    if value is None:
        if required:
            raise JobError(f"{where}.{key} is required; set it in [{where}]")
        return None
    if not isinstance(value, str) or not value.strip():
        raise JobError(f"{where}.{key} must be a non-empty string, got {value!r}")
    return value


def _int(table: dict, key: str, where: str, default: int, minimum: int = 1) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise JobError(f"{where}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(table: dict, key: str, where: str, default: float, minimum: float = 0.0) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise JobError(f"{where}.{key} must be a number >= {minimum}, got {value!r}")
    return float(value)


def _bool(table: dict, key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise JobError(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _choice(table: dict, key: str, where: str, default: str, choices: Sequence[str]) -> str:
    value = table.get(key, default)
    if value not in choices:
        raise JobError(f"{where}.{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_no_credentials(options: Any, where: str) -> None:
    """Refuse options whose names hold secrets (JobError naming `where` and the standard chains)."""
    _check_no_credentials(options, where)


def parse_value(text: str) -> Any:
    """A `--set` value: a TOML value, or the text itself when it does not parse as one."""
    return _parse_value(text)


def _check_no_credentials(options: Any, where: str) -> None:
    if isinstance(options, dict):
        for key, value in options.items():
            if _CREDENTIAL_NAME.search(str(key)):
                raise JobError(
                    f"{where}.{key} looks like a credential; job files must not hold credentials. Remove it and "
                    f"use the standard chains instead (environment variables such as AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or an instance role)"
                )
            _check_no_credentials(value, f"{where}.{key}")
    elif isinstance(options, list):
        for i, value in enumerate(options):
            _check_no_credentials(value, f"{where}[{i}]")


def _check_path_text(path: str, where: str) -> None:
    if "://" in path:
        rest = path.split("://", 1)[1]
        authority = rest.split("/", 1)[0]
        if "@" in authority:
            raise JobError(
                f"{where} embeds credentials (user:password@host) in the URI; remove them and use the "
                f"standard credential chains"
            )


def parse_job(raw: dict, origin: str = "<job>") -> JobSpec:
    """Validate a parsed TOML document into a JobSpec."""
    _unknown(raw, _SECTIONS, "job")

    m = _table(raw, "model")
    _unknown(m, _MODEL_KEYS, "model")
    model = ModelSpec(
        source=_str(m, "source", "model", required=True),
        dtype=_choice(m, "dtype", "model", "bfloat16", DTYPES),
        adapter=_str(m, "adapter", "model"),
    )
    _check_path_text(model.source, "model.source")
    if model.adapter:
        _check_path_text(model.adapter, "model.adapter")

    i = _table(raw, "input")
    _unknown(i, _INPUT_KEYS, "input")
    paths = i.get("path")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        raise JobError(
            f"input.path must be a path or glob (or a list of them) of Parquet files, got {paths!r}; "
            f"e.g. path = \"s3://bucket/data/*.parquet\""
        )
    for p in paths:
        _check_path_text(p, "input.path")
    inp = InputSpec(
        paths=tuple(paths),
        id_column=_str(i, "id_column", "input"),
        text_column=_str(i, "text_column", "input"),
        image_column=_str(i, "image_column", "input"),
        max_input_tokens=_int(i, "max_input_tokens", "input", 8192, minimum=8),
        long_input=_choice(i, "long_input", "input", "error", LONG_INPUT_POLICIES),
        unique_ids=_bool(i, "unique_ids", "input", False),
    )
    named = [c for c in (inp.id_column, inp.text_column, inp.image_column) if c]
    if len(set(named)) != len(named):
        raise JobError(f"[input] names the same column twice ({named}); id, text and image must be different columns")

    o = _table(raw, "output")
    _unknown(o, _OUTPUT_KEYS, "output")
    out_path = _str(o, "path", "output", required=True)
    _check_path_text(out_path, "output.path")
    output = OutputSpec(
        path=out_path.rstrip("/") or "/",
        rows_per_file=_int(o, "rows_per_file", "output", 10_000),
        compression=_choice(o, "compression", "output", "zstd", COMPRESSIONS),
        keep_columns=_names(o, "keep_columns", "output"),
    )

    tasks_raw = raw.get("task")
    if tasks_raw is None:
        raise JobError("the job has no [[task]]; add at least one, e.g. [[task]] kind = \"summarize\"")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise JobError("task must be an array of tables: write each one as [[task]]")
    tasks = tuple(_parse_task(t, n, inp) for n, t in enumerate(tasks_raw))
    if inp.long_input == "chunk":
        for n, task in enumerate(tasks):
            _check_chunkable(task, n, inp.max_input_tokens)
    seen: dict[str, str] = {}
    for n, task in enumerate(tasks):
        for name in columns.reserved_names(task.output_column, task.classify):
            if name in columns.RESERVED or name.startswith(columns.INTERNAL_PREFIX):
                raise JobError(
                    f"task[{n}].output_column {task.output_column!r} makes column {name!r}, which is reserved; "
                    f"choose another output_column"
                )
            if name in seen:
                raise JobError(
                    f"task[{n}].output_column {task.output_column!r} collides with {seen[name]} (column {name!r}); "
                    f"give every task its own output_column"
                )
            seen[name] = f"task[{n}]"
    _check_keep_columns(output.keep_columns, seen)

    r = _table(raw, "resources", required=False)
    _unknown(r, _RESOURCE_KEYS, "resources")
    actors = r.get("gpu_actors", 1)
    if isinstance(actors, list):
        if (len(actors) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in actors)
                or not 1 <= actors[0] <= actors[1]):
            raise JobError(f"resources.gpu_actors as a list must be [min, max] with 1 <= min <= max, got {actors!r}")
        min_actors, max_actors = actors
    elif isinstance(actors, int) and not isinstance(actors, bool) and actors >= 1:
        min_actors = max_actors = actors
    else:
        raise JobError(f"resources.gpu_actors must be an integer >= 1 or [min, max], got {actors!r}")
    gpus = _number(r, "gpus_per_actor", "resources", 1.0)
    if gpus > 1 and gpus != int(gpus):
        raise JobError(f"resources.gpus_per_actor above 1 must be a whole number, got {gpus}")
    resources = ResourcesSpec(
        min_actors=min_actors,
        max_actors=max_actors,
        gpus_per_actor=gpus,
        cpus_per_actor=_number(r, "cpus_per_actor", "resources", 1.0),
        rows_per_call=_int(r, "rows_per_call", "resources", default_rows_per_call(gpus, tasks)),
        max_batch_tokens=_int(r, "max_batch_tokens", "resources", 1) if "max_batch_tokens" in r else None,
        call_timeout_s=_call_timeout(r),
    )
    storage = _table(raw, "storage", required=False)
    for protocol, options in storage.items():
        if not isinstance(options, dict):
            raise JobError(f"storage.{protocol} must be a table of fsspec options ([storage.{protocol}])")
    _check_no_credentials(storage, "storage")

    return JobSpec(model=model, input=inp, output=output, tasks=tasks, resources=resources,
                   storage=copy.deepcopy(storage), origin=origin)


# Rows per model call when the job sets none. A GPU actor decodes through up to 256 slots (the Generator's
# max_batch_size) and refills them only within a call, so a call of 256 rows drains from its first finished
# row on; four times the slots drain for the last quarter only. Slot occupancy on the bench's longtail rows
# with compiled static steps as on a GPU (counted on CPU): 0.50 at 256 rows per call, 0.74 at 512, 0.95 at
# 1024. Jobs that read images keep 256 (each row's uint8 image is ~2.4 MB at 896 px in the actor's memory),
# and CPU actors too (a CPU call is slow: the hang guard's clock and a retry's cost grow with it).
ROWS_PER_CALL = 256
GPU_TEXT_ROWS_PER_CALL = 1024


def default_rows_per_call(gpus_per_actor: float, tasks: tuple[TaskSpec, ...]) -> int:
    """resources.rows_per_call when the job sets none (see GPU_TEXT_ROWS_PER_CALL)."""
    text_only = not any(t.uses_image for t in tasks)
    return GPU_TEXT_ROWS_PER_CALL if gpus_per_actor > 0 and text_only else ROWS_PER_CALL


def _call_timeout(r: dict) -> float:
    value = r.get("call_timeout_s", DEFAULT_CALL_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise JobError(f"resources.call_timeout_s must be a number of seconds > 0, got {value!r}; it bounds one "
                       f"model call (default {DEFAULT_CALL_TIMEOUT_S:g}): raise it if a call of rows_per_call rows "
                       f"really takes longer")
    return float(value)


def _names(table: dict, key: str, where: str) -> tuple[str, ...]:
    """A list of distinct non-empty column names (empty when absent)."""
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise JobError(f"{where}.{key} must be a list of column names, e.g. {key} = [\"title\", \"url\"], got "
                       f"{value!r}")
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
        raise JobError(f"{where}.{key} names {', '.join(map(repr, repeated))} more than once; name each column once")
    return tuple(value)


def _check_keep_columns(keep: tuple[str, ...], outputs: dict[str, str]) -> None:
    """A kept input column keeps its name in the output, so it must not be one the job writes itself."""
    for name in keep:
        owner = None
        if name in columns.RESERVED:
            owner = "the output's own columns (id, error and provenance columns)"
        elif name in outputs:
            owner = f"{outputs[name]}'s output columns"
        elif name.startswith(columns.INTERNAL_PREFIX):
            owner = f"the internal columns (names starting with {columns.INTERNAL_PREFIX!r})"
        if owner:
            raise JobError(f"output.keep_columns names {name!r}, which clashes with {owner}; a kept column keeps its "
                           f"input name, so rename the column in the input or change that task's output_column "
                           f"(the id is always in the output as {columns.ID!r})")


def _parse_task(t: Any, n: int, inp: InputSpec) -> TaskSpec:
    where = f"task[{n}]"
    if not isinstance(t, dict):
        raise JobError(f"{where} must be a table ([[task]])")
    _unknown(t, _TASK_KEYS, where)
    kind_name = t.get("kind")
    if kind_name not in TASK_KINDS:
        raise JobError(f"{where}.kind must be one of {', '.join(map(repr, TASK_KINDS))}, got {kind_name!r}")
    kind = TASK_KINDS[kind_name]
    output_column = _str(t, "output_column", where, default=kind.output_column)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", output_column):
        raise JobError(f"{where}.output_column {output_column!r} must be letters, digits and _ (starting with a "
                       f"letter)")
    for key in sorted(_CLASSIFY_KEYS & set(t)):
        if not kind.classify:
            raise JobError(f"{where}.{key} applies to classify tasks only; remove it from this {kind_name} task")
    for key in sorted(set(GENERATION_FIELDS) & set(t)):
        if kind.classify:
            raise JobError(f"{where}.{key} is a generation setting, but a classify task generates nothing: it scores "
                           f"its labels. Remove it (to set it on the other tasks only, use --set task.N.{key}=...)")
    prompt_column = _str(t, "prompt_column", where)
    if prompt_column is not None:
        if not kind.open_fields:
            raise JobError(f"{where}.prompt_column applies to generate and classify tasks; a {kind_name} task builds "
                           f"its prompt from its template (prompt)")
        if "prompt" in t:
            raise JobError(f"{where} sets both prompt and prompt_column; each row's prompt comes from one of them: "
                           f"a template (prompt = \"... {{question}} ...\") or a column (prompt_column)")
        prompt, names = None, set()
    else:
        prompt = t.get("prompt", kind.template)
        if prompt is None:
            raise JobError(f"{where} ({kind_name}) needs a prompt: a template whose fields name input columns "
                           f"(prompt = \"Title: {{title}}\\n{{body}}\\nKeywords:\"), or prompt_column = \"<a column "
                           f"holding each row's prompt>\"")
        if not isinstance(prompt, str) or not prompt.strip():
            raise JobError(f"{where}.prompt must be a non-empty string, got {prompt!r}")
        try:
            names = check_template(kind, prompt)
        except ValueError as exc:
            raise JobError(f"{where}.prompt: {exc}") from exc
    languages = {}
    for key in ("source_language", "target_language"):
        value = _str(t, key, where)
        if value is not None and kind_name != "translate":
            raise JobError(f"{where}.{key} applies to translate tasks only; remove it from this {kind_name} task")
        if key in names and value is None:
            raise JobError(f"{where}.{key} is required: the prompt uses {{{key}}} (e.g. {key} = \"German\")")
        languages[key] = value
    params = None
    if not kind.classify:
        generation = dict(kind.generation)
        for key, types in GENERATION_FIELDS.items():
            if key not in t:
                continue
            value = t[key]
            if isinstance(value, bool) or not isinstance(value, types):
                raise JobError(f"{where}.{key} must be {'an integer' if types is int else 'a number'}, got {value!r}")
            generation[key] = value
        try:
            params = GenerationParams(**generation)  # the model's own checks, with the field names the user wrote
        except (TypeError, ValueError) as exc:
            raise JobError(f"{where}: {exc}") from exc
    uses_text, uses_image = TEXT_FIELD in names, IMAGE_FIELD in names
    if uses_text and not inp.text_column:
        raise JobError(f"{where} ({kind_name}) reads text, but [input] has no text_column; set input.text_column")
    if uses_image and not inp.image_column:
        raise JobError(f"{where} ({kind_name}) reads images, but [input] has no image_column; set input.image_column")
    classify = _parse_classify(t, where) if kind.classify else {}
    fields = column_fields(kind, names)
    if kind.open_fields and not (fields or uses_text or uses_image or prompt_column or classify.get("labels_column")):
        raise JobError(f"{where}.prompt names no input column, so every row would get the same prompt; name the "
                       f"columns it reads ({{text}}, {{image}}, or any input column such as {{title}}), or set "
                       f"prompt_column to take each row's prompt from a column")
    return TaskSpec(
        kind=kind_name,
        output_column=output_column,
        prompt=prompt,
        source_language=languages["source_language"],
        target_language=languages["target_language"],
        generation=params,
        uses_text=uses_text,
        uses_image=uses_image,
        fields=fields,
        prompt_column=prompt_column,
        **classify,
    )


def _check_chunkable(task: TaskSpec, n: int, max_input_tokens: int) -> None:
    """long_input = "chunk" summarizes a long text's pieces and then their summaries with the task's own
    prompt (operators/chunking.py): a JobError for a task where that has no meaning or cannot finish."""
    where = f"task[{n}]"
    other = ("run it in a job of its own with input.long_input = \"error\" or \"truncate\", or drop "
             "input.long_input = \"chunk\"")
    if task.kind not in CHUNK_KINDS:
        raise JobError(f"input.long_input = \"chunk\" applies to {' and '.join(CHUNK_KINDS)} tasks only: the outputs "
                       f"of a long text's pieces are put through the prompt again, which has no meaning for {where} "
                       f"({task.kind}); {other}")
    if not task.uses_text:
        raise JobError(f"input.long_input = \"chunk\" splits the {{text}} of a prompt, but {where}'s prompt has no "
                       f"{{text}}{' (it reads prompt_column)' if task.prompt_column else ''}; put {{text}} in its "
                       f"prompt template, or {other}")
    if task.uses_image:
        raise JobError(f"input.long_input = \"chunk\" cannot split a prompt with an {{image}} ({where}): every "
                       f"piece would repeat the image; {other}")
    if task.sequences > 1:
        raise JobError(f"input.long_input = \"chunk\" makes one output per row, but {where} asks for "
                       f"num_return_sequences = {task.sequences}; set it to 1, or {other}")
    if 2 * task.generation.max_new_tokens >= max_input_tokens:
        raise JobError(f"input.long_input = \"chunk\" joins the pieces' outputs (up to {where}.max_new_tokens = "
                       f"{task.generation.max_new_tokens} tokens each) into new prompts of at most "
                       f"input.max_input_tokens = {max_input_tokens}, which must hold at least two of them and the "
                       f"prompt template; raise max_input_tokens above {2 * task.generation.max_new_tokens} or lower "
                       f"max_new_tokens")


def _parse_classify(t: dict, where: str) -> dict:
    """A classify task's own settings: its labels (fixed, or a column), score mode, multi_label, threshold."""
    labels, labels_column = t.get("labels"), _str(t, "labels_column", where)
    if labels is None and labels_column is None:
        raise JobError(f"{where} (classify) has no labels to choose from: set labels = [\"sports\", \"politics\", ...] "
                       f"for the same candidates on every row, or labels_column = \"<a list<string> column of each "
                       f"row's candidates>\"")
    if labels is not None and labels_column is not None:
        raise JobError(f"{where} sets both labels and labels_column; the candidates come from one of them: the same "
                       f"list for every row (labels) or a column of each row's own (labels_column)")
    if labels is not None:
        if not isinstance(labels, list) or not labels:
            raise JobError(f"{where}.labels must be a non-empty list of label strings, e.g. labels = [\"yes\", "
                           f"\"no\"], got {labels!r}")
        for label in labels:
            if not isinstance(label, str) or not label.strip():
                raise JobError(f"{where}.labels holds {label!r}; every label must be a non-empty string")
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise JobError(f"{where}.labels lists {', '.join(map(repr, repeated))} more than once; list each label "
                           f"once")
        labels = tuple(labels)
    score = _choice(t, "score", where, "sum", SCORE_MODES)
    multi_label = _bool(t, "multi_label", where, False)
    threshold = t.get("threshold")
    if threshold is not None:
        if not multi_label:
            raise JobError(f"{where}.threshold applies with multi_label = true only (a single-label task returns its "
                           f"most probable label); set multi_label = true or remove threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise JobError(f"{where}.threshold must be a probability in [0, 1] (every label whose probability is at "
                           f"or above it is returned), got {threshold!r}")
        threshold = float(threshold)
    elif multi_label:
        raise JobError(f"{where}: multi_label = true needs a threshold: every label whose probability (softmax over "
                       f"the row's labels) is at or above it is returned, e.g. threshold = 0.3")
    return {"labels": labels, "labels_column": labels_column, "score": score, "multi_label": multi_label,
            "threshold": threshold}
