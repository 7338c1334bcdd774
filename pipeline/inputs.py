"""Input: listing the files, their footers and identities, units of work, ids, reading a unit.

The unit of work is a fixed row range of one input file ([start, stop), rows_per_file rows, from
the Parquet footer's row count). Its key is a hash of (run config hash, input URI, the file's
identity as stored, start, stop, the unit's duplicate-id marks), so the same job over the same
input always names the same units, a file that changed (rewritten, grown, shrunk) gets new units,
and an output name never holds an id or an input path. A file's identity is its size plus its
ETag where the store gives one (S3, GCS, Azure), else its modification time (local disks); see
file_identity.

Each row read also gets an input hash (row_hashes) of what in it decides its result, which the output
keeps: a rerun whose units changed finds the rows whose result it already has by that hash
(incremental.py), so a renamed, moved or re-sharded file, or a file with one edited row, costs only
its new rows.

Duplicate ids (an id_column whose value repeats) are found before any work by find_duplicate_ids,
which reads only the id column of every file and keeps 16 bytes per input row in the driver (a
64-bit fingerprint and a position; candidates are then compared exactly): 10 million rows take
about 160 MB, for the few seconds of the scan. The first occurrence in (file, row) order keeps
its result; every later one becomes an error row of kind "duplicate_id" naming the first.

Input files drift across a corpus (a column goes missing or changes type): the schema-drift
policy below decides, per file, what becomes a per-row error and what fails the job.

Not here: the output and its commit (commit.py), the Ray plan (build.py), what the columns mean
(operators/columns.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import columns as C

from .paths import GLOB_CHARS, StorageError, open_fs, uri_of


@dataclass(frozen=True)
class InputFile:
    uri: str  # full URI (file:///abs/path, s3://bucket/key)
    num_rows: int  # from the Parquet footer
    schema: pa.Schema  # Arrow schema from the footer
    identity: str = ""  # the file as stored: size plus ETag or mtime (file_identity); part of unit keys


UNIT_ITEM_FIELDS = ("key", "uri", "start", "stop", "identity", "duplicates", "reused")  # Unit.to_item's columns


@dataclass(frozen=True)
class Unit:
    """A fixed row range of one input file: the unit of work and of commit."""

    key: str  # hash of (run config hash, uri, identity, start, stop, duplicates): names its output
    uri: str  # input file
    start: int  # first row (inclusive)
    stop: int  # last row (exclusive)
    identity: str = ""  # the input file's identity when the job was planned (read_unit checks it)
    duplicates: tuple[tuple[int, str], ...] = ()  # (row, message) of rows whose id came earlier
    # Rows whose result an earlier run already holds (incremental.py): the read stage leaves them out and
    # the driver commits their earlier output. Not part of the key: the unit's output is the same either way.
    reused: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_item(self) -> dict:
        """The unit as a row of Ray Data's input (from_items). Duplicate marks travel as JSON: Arrow
        has no column type for a list of (int, str) pairs."""
        return {"key": self.key, "uri": self.uri, "start": self.start, "stop": self.stop, "identity": self.identity,
                "duplicates": json.dumps(self.duplicates), "reused": json.dumps(self.reused)}

    @classmethod
    def from_item(cls, item: dict) -> Unit:
        """The inverse of to_item."""
        duplicates = tuple((int(row), str(message)) for row, message in json.loads(item.get("duplicates") or "[]"))
        return cls(key=item["key"], uri=item["uri"], start=int(item["start"]), stop=int(item["stop"]),
                   identity=item.get("identity") or "", duplicates=duplicates,
                   reused=tuple(int(row) for row in json.loads(item.get("reused") or "[]")))


def file_identity(info: dict) -> str:
    """What identifies a file's content as stored, from fsspec's info(): its size plus the store's
    ETag (S3, GCS, Azure) where there is one, else its modification time (local disks, HDFS).

    A rewrite changes it (a new ETag, a new mtime); a copy or rename keeps neither the name nor,
    on local disks, the mtime, so it is a new file too. Content hashes would survive renames but
    cost a full read of every file on every run.
    """
    size = info.get("size")
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return f"size={size};etag={str(info[key]).strip(chr(34))}"
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        if info.get(key) is not None:
            value = info[key]
            return f"size={size};mtime={value.isoformat() if hasattr(value, 'isoformat') else value}"
    return f"size={size}"


def list_inputs(paths: tuple[str, ...], options: dict) -> list[str]:
    """Parquet file URIs that `paths` (files, directories or globs) name, sorted, deduplicated."""
    found: set[str] = set()
    for path in paths:
        fs, p = open_fs(path, options)
        try:
            if any(ch in p for ch in GLOB_CHARS):
                matches = [m for m in fs.glob(p) if fs.isfile(m)]
            elif fs.isdir(p):
                matches = [m for m in fs.find(p) if m.endswith(".parquet")
                           and not any(part.startswith(("_", ".")) for part in m[len(p):].split("/"))]
            elif fs.exists(p):
                matches = [p]
            else:
                matches = []
        except Exception as exc:
            raise StorageError(f"cannot list input {path!r}: {type(exc).__name__}: {exc}") from exc
        if not matches:
            raise StorageError(f"input.path {path!r} matches no file; check the path or glob (and [storage] options)")
        found.update(uri_of(fs, m) for m in matches)
    return sorted(found)


def read_footers(uris: list[str], options: dict, threads: int = 16) -> list[InputFile]:
    """Row counts and schemas of the input files, read in parallel from their footers only."""

    def one(uri: str) -> InputFile:
        fs, p = open_fs(uri, options)
        try:
            fs.invalidate_cache(p)  # a listing may have cached an older info() of a rewritten file
            identity = file_identity(fs.info(p))
            with fs.open(p, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
                return InputFile(uri=uri, num_rows=meta.num_rows, schema=meta.schema.to_arrow_schema(),
                                 identity=identity)
        except Exception as exc:
            raise StorageError(
                f"input file {uri!r} is not a readable Parquet file ({type(exc).__name__}: {exc}); remove it from "
                f"input.path or fix it"
            ) from exc

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        return list(pool.map(one, uris))


def make_units(files: list[InputFile], rows_per_file: int, run_hash: str,
               duplicates: dict[str, dict[int, DuplicateId]] | None = None) -> list[Unit]:
    """The units of `files`; `duplicates` (from find_duplicate_ids) marks rows whose id came earlier,
    and is part of each unit's key, so a unit whose marks change is a new unit."""
    units = []
    for f in files:
        marks = (duplicates or {}).get(f.uri, {})
        for start in range(0, f.num_rows, rows_per_file):
            stop = min(start + rows_per_file, f.num_rows)
            dups = tuple((row, marks[row].message()) for row in sorted(marks) if start <= row < stop)
            key = unit_key(run_hash, f.uri, f.identity, start, stop, dups)
            units.append(Unit(key=key, uri=f.uri, start=start, stop=stop, identity=f.identity, duplicates=dups))
    return units


def unit_key(run_hash: str, uri: str, identity: str, start: int, stop: int,
             duplicates: tuple[tuple[int, str], ...]) -> str:
    """The key that names a unit's output: a hash of everything that decides its rows."""
    text = "\0".join([run_hash, uri, identity, str(start), str(stop), json.dumps(duplicates)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def first_rows(files: list[InputFile], units: list[Unit], limit: int,
               run_hash: str) -> tuple[list[InputFile], list[Unit]]:
    """The files and units of the first `limit` rows in (file, row) order (`t5g2 run --limit`): the
    files past them are dropped, the file where the limit falls keeps its first rows, and a unit cut
    by the limit becomes a shorter unit with a key of its own."""
    kept_files, remaining = [], limit
    for f in files:
        if remaining <= 0:
            break
        kept_files.append(f if f.num_rows <= remaining else replace(f, num_rows=remaining))
        remaining -= f.num_rows
    rows_of = {f.uri: f.num_rows for f in kept_files}
    kept_units = []
    for u in units:
        stop = min(u.stop, rows_of.get(u.uri, 0))
        if stop <= u.start:
            continue
        if stop < u.stop:
            dups = tuple((row, message) for row, message in u.duplicates if row < stop)
            u = replace(u, key=unit_key(run_hash, u.uri, u.identity, u.start, stop, dups), stop=stop, duplicates=dups)
        kept_units.append(u)
    return kept_files, kept_units


def inputs_fingerprint(identities: list[tuple[str, str]]) -> str:
    """One hash of the input files as stored: their URIs and identities (file_identity), in any order.
    The run report records it; `t5g2 status` lists the input again and compares."""
    text = "\n".join(f"{uri}\0{identity}" for uri, identity in sorted(identities))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def current_identities(paths: tuple[str, ...], options: dict, threads: int = 16) -> list[tuple[str, str]]:
    """(URI, identity) of every file `paths` names now, from a listing and each file's info (no footer
    is read): what inputs_fingerprint takes, computed as read_footers computes identities."""
    uris = list_inputs(paths, options)

    def one(uri: str) -> tuple[str, str]:
        fs, p = open_fs(uri, options)
        try:
            fs.invalidate_cache(p)
            return uri, file_identity(fs.info(p))
        except Exception as exc:
            raise StorageError(f"cannot read the info of input file {uri!r} ({type(exc).__name__}: {exc})") from exc

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        return list(pool.map(one, uris))


def _fingerprints(ids: pa.ChunkedArray) -> np.ndarray:
    """64 bits per id: integers as themselves (exact), strings and bytes hashed (checked exactly later)."""
    if pa.types.is_integer(ids.type):
        ids = ids.cast(pa.uint64() if pa.types.is_uint64(ids.type) else pa.int64()).fill_null(0)
        return ids.to_numpy().view(np.uint64)
    import pandas as pd  # Ray Data's own dependency; its hash_array is a fixed-key SipHash of str / bytes

    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) or pa.types.is_binary(ids.type):
        values = ids.cast(pa.large_binary()).to_pylist()  # string and large_string ids hash alike
    else:
        values = [None if v is None else repr(v) for v in ids.to_pylist()]  # dates, decimals, ...
    return pd.util.hash_array(np.asarray(values, dtype=object), categorize=False)


@dataclass(frozen=True)
class DuplicateId:
    """A row whose id already appeared earlier in the input, in (file, row) order."""

    id: object  # the id value
    first_uri: str  # where it appeared first: file
    first_row: int  # and row

    def message(self) -> str:
        return (f"id {self.id!r} appears earlier in the input, at {self.first_uri} row {self.first_row}; this later "
                f"row is not computed (make the ids unique, or set input.unique_ids = true to stop such a job "
                f"before any work)")


def find_duplicate_ids(files: list[InputFile], column: str, options: dict,
                       threads: int = 8) -> dict[str, dict[int, DuplicateId]]:
    """Rows whose id already appeared earlier in (file, row) order: uri -> row -> DuplicateId. Reads
    only the id column; memory about 16 bytes per input row (see above). Null ids repeat nothing."""

    def read_ids(f: InputFile) -> pa.ChunkedArray:
        fs, p = open_fs(f.uri, options)
        try:
            with fs.open(p, "rb") as handle:
                return pq.ParquetFile(handle).read(columns=[column]).column(column)
        except Exception as exc:
            raise StorageError(f"cannot read the id column {column!r} of {f.uri!r} ({type(exc).__name__}: {exc}); "
                               f"check that the file is readable") from exc

    offsets = np.cumsum([0] + [f.num_rows for f in files])
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        prints = np.concatenate([_fingerprints(ids) for ids in pool.map(read_ids, files)] or [np.zeros(0, np.uint64)])
    order = np.argsort(prints, kind="stable")  # equal fingerprints stay in (file, row) order
    ordered = prints[order]
    repeat = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
    if not len(repeat):
        return {}
    # Positions sharing a fingerprint with another; their real ids are read again and compared exactly.
    candidates = sorted({int(order[i]) for i in repeat} | {int(order[i - 1]) for i in repeat})
    file_of = {pos: int(np.searchsorted(offsets, pos, side="right")) - 1 for pos in candidates}
    values: dict[int, object] = {}
    for index in sorted(set(file_of.values())):
        positions = [pos for pos, fi in file_of.items() if fi == index]
        rows = pa.array([pos - int(offsets[index]) for pos in positions], type=pa.int64())
        values.update(zip(positions, read_ids(files[index]).take(rows).to_pylist()))
    first_of: dict[object, int] = {}
    out: dict[str, dict[int, DuplicateId]] = {}
    for pos in candidates:  # ascending: the first position of each real id is its first occurrence
        value = values[pos]
        if value is None:
            continue
        if value not in first_of:
            first_of[value] = pos
            continue
        first = first_of[value]
        out.setdefault(files[file_of[pos]].uri, {})[pos - int(offsets[file_of[pos]])] = DuplicateId(
            id=value, first_uri=files[file_of[first]].uri, first_row=first - int(offsets[file_of[first]]))
    return out


# Columns of read_unit's blocks that say where a row is, not what it is: never part of its input hash.
_PLACE_COLUMNS = (C.UNIT, C.ROW, C.INPUT_HASH)


def row_hashes(block: pa.Table, derived_id: bool) -> pa.Array:
    """The INPUT_HASH of each row of a read_unit block: a hash of every column the job reads from the row
    (text, image bytes, prompt fields, labels, keep columns, the read errors and duplicate marks beside
    them) and of its id, unless the id is derived from the row's place (`derived_id`: no id_column), so
    that a row moved to another file or row keeps its hash. Column names are hashed with their values,
    so a value cannot pass for another column's.

    Python per row, hashlib per value: about a microsecond per short value, and the hashing of an image
    runs at memory speed; small next to reading the row. Hand-written because Arrow has no row hash."""
    skip = set(_PLACE_COLUMNS) | ({C.ID} if derived_id else set())
    names = sorted(n for n in block.column_names if n not in skip)
    digests = [hashlib.sha256() for _ in range(block.num_rows)]
    for name in names:
        column = block.column(name)
        raw = pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type) or \
            pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        tag = name.encode() + b"\0"
        # Read errors and duplicate marks are columns only some blocks have: a null there is no mark, and
        # hashes as if the column were absent, so a row's hash does not depend on its neighbours.
        mark = name in (C.ID_ERROR, C.ID_ERROR_MESSAGE) or name.endswith(("_error", "_error_message"))
        for digest, value in zip(digests, column.to_pylist()):
            if value is None and mark:
                continue
            if value is None:
                data = b"\1"
            elif raw:
                data = b"\2" + (value if isinstance(value, bytes) else value.encode())
            else:  # numbers, dates, lists of labels: their JSON text, the same for the same typed value
                data = b"\3" + json.dumps(value, default=str, sort_keys=True).encode()
            digest.update(tag + len(data).to_bytes(8, "little") + data)
    return pa.array([d.hexdigest()[:32] for d in digests], type=pa.string())


def derived_ids(uri: str, start: int, stop: int) -> pa.Array:
    """Deterministic ids for rows [start, stop) of a file: a hash of its URI and the row number."""
    prefix = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return pa.array([f"{prefix}-{row}" for row in range(start, stop)], type=pa.string())


# ---- schema drift: what each input column may be, file by file -----------------------------
#
# Input files written at different times drift: a column goes missing, changes type, gains
# neighbours. The policy, applied per file by read_unit and to every footer by run.validate:
#   * text or image column missing from a file, or of a type that cannot hold text / image bytes:
#     every row of that file gets error kind "column_missing" / "column_type" in the tasks that read
#     the column; its other tasks run. (No file with a usable column at all is a wrong job instead:
#     validate fails it before any work.)
#   * compatible types are read as they are: text as string, large_string, binary, large_binary (UTF-8
#     checked per row), a dictionary of those, or null; images as binary, large_binary, {bytes, path}
#     structs (Hugging Face datasets' Image), or null. Extra columns are never read.
#   * the same holds for the other columns a task reads (ExtraColumn): a prompt template's fields and
#     prompt_column (text as above, or numbers, booleans, dates and times, written as text) and a
#     classify task's labels_column (a list of strings); a file without one gives its rows
#     column_missing / column_type in the tasks that read it.
#   * the id column must be in every file (an id means the same thing in every output row, so a file
#     cannot fall back to derived ids), and its types must cast losslessly to one output type:
#     integers of any width but uint64 -> int64, string / large_string -> large_string, binary /
#     large_binary -> large_binary; anything else must be the same type in every file.
#   * so must every output.keep_column (it is copied into every output row), its types unified to one
#     output type by Arrow's permissive promotion (keep_output_type).

COLUMN_MISSING, COLUMN_TYPE = C.COLUMN_MISSING, C.COLUMN_TYPE  # the error kinds of this policy
COLUMN_SETTINGS = {"id": "input.id_column", "text": "input.text_column", "image": "input.image_column",
                   "field": "the prompt field", "labels": "labels_column", "keep": "output.keep_columns"}
EXTRA_ROLES = ("field", "labels", "keep")  # ExtraColumn.role


@dataclass(frozen=True)
class ExtraColumn:
    """An input column the job reads besides id, text and image, and what for."""

    column: str  # its name in the input files
    role: str  # "field" (a template field or prompt_column: text), "labels" (list<string>), "keep" (copied)
    type: pa.DataType | None = None  # keep: the output type every file's values are cast to
    setting: str = ""  # how messages name it (e.g. "task[0].labels_column"); COLUMN_SETTINGS by default

    def __post_init__(self):
        if self.role not in EXTRA_ROLES:
            raise ValueError(f"ExtraColumn.role must be one of {EXTRA_ROLES}, got {self.role!r}")
        if (self.role == "keep") != (self.type is not None):
            raise ValueError("a keep column needs its output type, and only a keep column has one")

    @property
    def internal(self) -> str:
        """The internal column it travels in between stages (operators/columns.py)."""
        return {"field": C.field_column, "labels": C.labels_column, "keep": C.keep_column}[self.role](self.column)


@dataclass(frozen=True)
class ColumnProblem:
    """Why one input file cannot give a column the job reads; its rows get this as their error."""

    kind: str  # COLUMN_MISSING | COLUMN_TYPE (error kinds of operators/columns.py)
    message: str  # names the file, the column, what is wrong and the fix


def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_null(t))


def _is_bytes_type(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t)


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0 and _is_bytes_type(t.field("bytes").type)
    return _is_bytes_type(t)


def _is_scalar_type(t: pa.DataType) -> bool:
    """Values a template writes as text: numbers, booleans, dates and times."""
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)
            or pa.types.is_temporal(t))


def _is_field_type(t: pa.DataType) -> bool:
    return _is_text_type(t) or _is_scalar_type(t.value_type if pa.types.is_dictionary(t) else t)


def _is_labels_type(t: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    value = t.value_type.value_type if pa.types.is_dictionary(t.value_type) else t.value_type
    return pa.types.is_string(value) or pa.types.is_large_string(value) or pa.types.is_null(value)


_TYPE_CHECKS = {"text": _is_text_type, "image": _is_image_type, "field": _is_field_type, "labels": _is_labels_type}
_WANTED_TYPE = {
    "text": ("text must be a string column (or binary holding UTF-8)", "write the column as string"),
    "image": (("images must be encoded bytes (binary), or {bytes, path} structs as Hugging Face datasets "
               "write them"), "write the column as binary image bytes"),
    "field": ("a prompt field must be text (string, or binary holding UTF-8), a number, a boolean or a date",
              "write the column as string"),
    "labels": ("labels must be a list of strings", "write the column as list<string>"),
}


def _names(schema: pa.Schema, most: int = 20) -> str:
    names = schema.names
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "") if names else "none"


def column_problem(uri: str, schema: pa.Schema, role: str, column: str, setting: str = "") -> ColumnProblem | None:
    """None when file `uri` (its Arrow schema) has a usable `role` ("text" | "image" | "field" | "labels")
    column `column`; `setting` names it in messages (COLUMN_SETTINGS[role] by default)."""
    setting = setting or COLUMN_SETTINGS[role]
    if column not in schema.names:
        return ColumnProblem(COLUMN_MISSING, f"{setting} {column!r} is not a column of {uri} (its columns: "
                                             f"{_names(schema)}); add it to this file, or remove the file from "
                                             f"input.path")
    t = schema.field(column).type
    if _TYPE_CHECKS[role](t):
        return None
    need, fix = _WANTED_TYPE[role]
    return ColumnProblem(COLUMN_TYPE, f"{setting} {column!r} in {uri} has type {t}; {need}: {fix}, or remove the "
                                      f"file from input.path")


def id_transport_type(t: pa.DataType) -> pa.DataType | None:
    """The type ids of an input id column of type `t` travel in between stages, or None when `t`
    cannot be an id (nested types). One type per family, so that blocks of files whose id types
    differ losslessly (int32 and int64, string and large_string) meet in one batch safely; the
    committer casts them to the job's output id type (id_output_type)."""
    if pa.types.is_nested(t):
        return None
    if pa.types.is_integer(t):
        return pa.uint64() if pa.types.is_uint64(t) else pa.int64()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.large_string()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pa.large_binary()
    return t


def id_output_type(types: list[pa.DataType]) -> pa.DataType:
    """The one id type of a job's output for its files' id types: their type when all agree, else
    their common transport type; ValueError when they do not cast losslessly to one type."""
    distinct = list(dict.fromkeys(types))
    if len(distinct) == 1:
        return distinct[0]
    transport = {id_transport_type(t) for t in distinct}
    if len(transport) == 1 and None not in transport:
        return transport.pop()
    raise ValueError(f"id types {', '.join(map(str, distinct))} do not cast losslessly to one type")


def image_bytes(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Image bytes from a binary column or a {bytes, path} struct column (HF datasets' Image)."""
    if pa.types.is_struct(column.type):
        index = column.type.get_field_index("bytes")
        # flatten() keeps a null struct null in its fields; field() alone would not.
        column = pa.chunked_array([chunk.flatten()[index] for chunk in column.chunks],
                                  type=column.type.field(index).type)
    return column


def text_bytes(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Text as bytes: UTF-8 is checked per row in prepare, so invalid bytes become a row error."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_string(column.type):
        return column.cast(pa.binary())
    if pa.types.is_large_string(column.type):
        return column.cast(pa.large_binary())
    return column


def field_bytes(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A template field's values as large_binary UTF-8: text as its bytes, numbers, booleans and dates
    written as Arrow writes them as text ("42", "3.5", "true", "2024-05-01")."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if _is_scalar_type(column.type):
        column = column.cast(pa.large_string())
    return text_bytes(column).cast(pa.large_binary())


LABELS_TYPE = pa.large_list(pa.large_string())  # how a labels_column travels between stages


def labels_values(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A labels_column as list<large_string> (dictionary-encoded labels decoded)."""
    t = column.type
    if not pa.types.is_null(t) and pa.types.is_dictionary(t.value_type):
        column = column.cast(pa.large_list(t.value_type.value_type))
    return column.cast(LABELS_TYPE)


def keep_output_type(types: list[pa.DataType]) -> pa.DataType:
    """The one output type of a keep column whose files hold `types`: their type when all agree, else
    Arrow's permissive promotion of them (int32 and int64 -> int64, string and large_string ->
    large_string, null and anything -> that); ValueError when they have none."""
    distinct = list(dict.fromkeys(types))
    if len(distinct) == 1:
        return distinct[0]
    try:
        return pa.unify_schemas([pa.schema([("c", t)]) for t in distinct], promote_options="permissive").field("c").type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"types {', '.join(map(str, distinct))} have no common type ({exc})") from None


_EXTRA_VALUES = {"field": field_bytes, "labels": labels_values}


_ROLES = (  # role, internal column, bytes of the input column, internal error kind and message columns
    ("text", C.TEXT, text_bytes, C.TEXT_ERROR, C.TEXT_ERROR_MESSAGE),
    ("image", C.IMAGE, image_bytes, C.IMAGE_ERROR, C.IMAGE_ERROR_MESSAGE),
)


def read_unit(unit: Unit, columns: dict, options: dict, block_rows: int,
              extra: tuple[ExtraColumn, ...] = ()) -> Iterator[pa.Table]:
    """The rows of one unit as Arrow tables of at most `block_rows` rows with the internal columns.

    `columns` maps "id", "text", "image" to input column names (or None); `extra` names the other
    columns to read (prompt fields, labels, keep columns); only those are read. Ids are cast to
    their id_transport_type, field values to UTF-8 bytes (field_bytes), labels to LABELS_TYPE, keep
    columns to their output type. A text, image, field or labels column this file lacks, or holds
    with an unusable type (see the schema-drift policy above), is not read: its internal column is
    null and the blocks carry its error kind and message columns (C.read_error_columns) on every row
    instead, which prepare turns into the rows' task errors. Rows the unit marks as duplicates get
    ID_ERROR and its message (prepare makes them errors in every task). Every row of the unit comes
    out, in order, with its INPUT_HASH (row_hashes), except the rows of unit.reused. A file whose
    identity is no longer the unit's (rewritten since the job was planned), or that lost its id or a
    keep column, is refused.
    """
    uri, start, stop = unit.uri, unit.start, unit.stop
    fs, p = open_fs(uri, options)
    try:
        fs.invalidate_cache(p)  # this worker may have read an older version of the file in an earlier run
        if unit.identity and (now := file_identity(fs.info(p))) != unit.identity:
            raise StorageError(f"{uri} changed during the run (it was {unit.identity} when the job was planned, "
                               f"now {now}); run the job again to compute its new content")
        with fs.open(p, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            problems = {role: column_problem(uri, schema, role, columns[role])
                        for role, *_ in _ROLES if columns.get(role)}
            if columns.get("id") and columns["id"] not in schema.names:
                raise StorageError(f"{uri} has no id column {columns['id']!r} any more: it changed during the run")
            extra_problems = {}
            for e in extra:
                if e.role == "keep":
                    if e.column not in schema.names:
                        raise StorageError(f"{uri} has no column {e.column!r} (output.keep_columns) any more: it "
                                           f"changed during the run")
                    extra_problems[e] = None
                else:
                    extra_problems[e] = column_problem(uri, schema, e.role, e.column, e.setting)
            wanted = [c for role in ("id", "text", "image") if (c := columns.get(role)) and problems.get(role) is None]
            wanted += [e.column for e, problem in extra_problems.items() if problem is None]
            wanted = list(dict.fromkeys(wanted))
            meta = parquet.metadata
            groups, offset, first = [], 0, None
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if offset + n > start and offset < stop:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            table = parquet.read_row_groups(groups, columns=wanted) if groups else None
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:  # after the store's own bounded retries
        raise StorageError(
            f"cannot read input file {uri!r} (rows {start}-{stop}): {type(exc).__name__}: {exc}; check that the store "
            f"is reachable and the file readable, then run the job again (committed units are kept)"
        ) from exc
    if table is None:
        return
    table = table.slice(start - first, stop - start)
    if table.num_rows != stop - start:
        raise StorageError(f"{uri} has {first + table.num_rows} rows in range, expected {stop}: it changed during "
                           f"the run")
    n = table.num_rows
    if columns.get("id"):
        ids = table.column(columns["id"])
        ids = ids.cast(id_transport_type(ids.type))
    else:
        ids = derived_ids(uri, start, stop)
    out = {C.UNIT: pa.array([unit.key] * n, type=pa.string()),
           C.ROW: pa.array(range(start, stop), type=pa.int64()),
           C.ID: ids}
    if unit.duplicates:
        marks = dict(unit.duplicates)
        messages = [marks.get(row) for row in range(start, stop)]
        out[C.ID_ERROR] = pa.array([C.DUPLICATE_ID if m else None for m in messages], type=pa.string())
        out[C.ID_ERROR_MESSAGE] = pa.array(messages, type=pa.string())
    for role, internal, to_bytes, kind_column, message_column in _ROLES:
        if not columns.get(role):
            continue
        problem = problems[role]
        if problem is None:
            out[internal] = to_bytes(table.column(columns[role]))
        else:
            out[internal] = pa.nulls(n, pa.binary())
            out[kind_column] = pa.array([problem.kind] * n, type=pa.string())
            out[message_column] = pa.array([problem.message] * n, type=pa.string())
    for e, problem in extra_problems.items():
        if e.role == "keep":
            try:
                out[e.internal] = table.column(e.column).cast(e.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise StorageError(f"{uri}: output.keep_columns {e.column!r} does not cast to {e.type} any more "
                                   f"({exc}): it changed during the run") from exc
        elif problem is None:
            out[e.internal] = _EXTRA_VALUES[e.role](table.column(e.column))
        else:
            kind_column, message_column = C.read_error_columns(e.internal)
            out[e.internal] = pa.nulls(n, LABELS_TYPE if e.role == "labels" else pa.large_binary())
            out[kind_column] = pa.array([problem.kind] * n, type=pa.string())
            out[message_column] = pa.array([problem.message] * n, type=pa.string())
    whole = pa.table(out)
    whole = whole.append_column(C.INPUT_HASH, row_hashes(whole, derived_id=not columns.get("id")))
    if unit.reused:  # their earlier output is committed by the driver (incremental.py)
        reused = pa.array(sorted(unit.reused), type=pa.int64())
        whole = whole.filter(pc.invert(pc.is_in(whole.column(C.ROW), value_set=reused)))
    for offset in range(0, whole.num_rows, block_rows):
        yield whole.slice(offset, block_rows)
