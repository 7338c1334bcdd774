"""Storage: input listing and reading by unit of work, and the exactly-once output commit.

Why our own commit protocol, and not Ray Data's CheckpointConfig (tried first, ray 2.60):
  * its checkpoint filter runs inside the read operator on an id column of the input, so a job
    without an id column (ids derived from file and row) cannot use it at all;
  * its file sink writes each data file straight to its final name, prefixed by a per-run write
    id, and files of uncommitted ("pending") checkpoints are deleted only by a later run: until
    then, and while a file is being written, readers of the output directory see partial files or
    rows that the rerun writes again under another name (research.md: ray PR 61047, ray 55043,
    s3fs 154);
  * a resume loads every finished id into driver memory and still re-reads all input (ray 60200,
    65891).
  A trial here (8 input files with an id column -> map -> write_parquet, driver killed mid-run)
  confirmed it: the plan wrote its output from one write task at the end, so the kill lost all
  work, and each run named its files with a new write id. So the commit is ours, as below; it
  needs no id column and re-reads no finished input.

The unit of work is a fixed row range of one input file ([start, stop), rows_per_file rows, from
the Parquet footer's row count). Its key is a hash of (run config hash, input URI, start, stop),
so the same job over the same input always names the same units, and an output name never holds
an id or an input path. Output layout under [output].path:

  part-<key>.parquet     one unit's rows, published whole: written to _tmp/ then renamed (local
                         disks), or sent as one PUT (object stores: a single request creates the
                         object at once, or not at all). No reader ever sees a partial file.
  _done/<key>.json       the done-marker, written after the part file; holds the unit's counts
  _job.json              the run config the directory belongs to; another config is refused
  _report.json           the latest run report
  _tmp/                  scratch for local renames; emptied at the start of each run

A rerun lists the markers and skips those units without reading their input. A part file without
a marker (a crash between publish and marker) is recomputed and replaced in one step under the
same name, so nothing is ever duplicated and its rows never vanish meanwhile; unmarked part files
of units the job no longer has (its input changed) and scratch files are deleted. Readers (pyarrow.dataset, Spark, DuckDB) skip names starting with
"_", so they see only part files.

Not here: the Ray plan (build.py), what the columns mean (operators/columns.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from operators import columns as C

PART_PREFIX = "part-"
DONE_DIR = "_done"
TMP_DIR = "_tmp"
MANIFEST = "_job.json"
REPORT = "_report.json"
_GLOB_CHARS = "*?["
_LOCAL_PROTOCOLS = ("file", "local")


class StorageError(OSError):
    """A path cannot be listed, read or written; the message names the path and the fix. An OSError,
    like the failures it wraps, so code that handles I/O errors handles it too."""


def _protocol(fs) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def open_fs(path: str, options: dict | None) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) for a local path or URI."""
    try:
        return fsspec.core.url_to_fs(path, **(options or {}))
    except Exception as exc:  # unknown protocol, missing driver package, bad option
        raise StorageError(f"cannot open {path!r}: {type(exc).__name__}: {exc}") from exc


def _uri(fs, path: str) -> str:
    return fs.unstrip_protocol(path)


# ---- input ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    uri: str  # full URI (file:///abs/path, s3://bucket/key)
    num_rows: int  # from the Parquet footer
    schema: pa.Schema  # Arrow schema from the footer


@dataclass(frozen=True)
class Unit:
    """A fixed row range of one input file: the unit of work and of commit."""

    key: str  # hash of (run config hash, uri, start, stop): names its output
    uri: str  # input file
    start: int  # first row (inclusive)
    stop: int  # last row (exclusive)

    @property
    def rows(self) -> int:
        return self.stop - self.start


def list_inputs(paths: tuple[str, ...], options: dict) -> list[str]:
    """Parquet file URIs that `paths` (files, directories or globs) name, sorted, deduplicated."""
    found: set[str] = set()
    for path in paths:
        fs, p = open_fs(path, options)
        try:
            if any(ch in p for ch in _GLOB_CHARS):
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
        found.update(_uri(fs, m) for m in matches)
    return sorted(found)


def read_footers(uris: list[str], options: dict, threads: int = 16) -> list[InputFile]:
    """Row counts and schemas of the input files, read in parallel from their footers only."""

    def one(uri: str) -> InputFile:
        fs, p = open_fs(uri, options)
        try:
            with fs.open(p, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
                return InputFile(uri=uri, num_rows=meta.num_rows, schema=meta.schema.to_arrow_schema())
        except Exception as exc:
            raise StorageError(
                f"input file {uri!r} is not a readable Parquet file ({type(exc).__name__}: {exc}); remove it from "
                f"input.path or fix it"
            ) from exc

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        return list(pool.map(one, uris))


def make_units(files: list[InputFile], rows_per_file: int, run_hash: str) -> list[Unit]:
    units = []
    for f in files:
        for start in range(0, f.num_rows, rows_per_file):
            stop = min(start + rows_per_file, f.num_rows)
            key = hashlib.sha256(f"{run_hash}\0{f.uri}\0{start}\0{stop}".encode()).hexdigest()[:32]
            units.append(Unit(key=key, uri=f.uri, start=start, stop=stop))
    return units


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
#   * the id column must be in every file (an id means the same thing in every output row, so a file
#     cannot fall back to derived ids), and its types must cast losslessly to one output type:
#     integers of any width but uint64 -> int64, string / large_string -> large_string, binary /
#     large_binary -> large_binary; anything else must be the same type in every file.

COLUMN_MISSING = "column_missing"
COLUMN_TYPE = "column_type"
COLUMN_SETTINGS = {"id": "input.id_column", "text": "input.text_column", "image": "input.image_column"}


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


_WANTED_TYPE = {
    "text": ("text must be a string column (or binary holding UTF-8)", "write the column as string"),
    "image": (("images must be encoded bytes (binary), or {bytes, path} structs as Hugging Face datasets "
               "write them"), "write the column as binary image bytes"),
}


def _names(schema: pa.Schema, most: int = 20) -> str:
    names = schema.names
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "") if names else "none"


def column_problem(uri: str, schema: pa.Schema, role: str, column: str) -> ColumnProblem | None:
    """None when file `uri` (its Arrow schema) has a usable `role` ("text" | "image") column `column`."""
    setting = COLUMN_SETTINGS[role]
    if column not in schema.names:
        return ColumnProblem(COLUMN_MISSING, f"{setting} {column!r} is not a column of {uri} (its columns: "
                                             f"{_names(schema)}); add it to this file, or remove the file from "
                                             f"input.path")
    t = schema.field(column).type
    if (_is_text_type if role == "text" else _is_image_type)(t):
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


_ROLES = (  # role, internal column, bytes of the input column, internal error kind and message columns
    ("text", C.TEXT, text_bytes, C.TEXT_ERROR, C.TEXT_ERROR_MESSAGE),
    ("image", C.IMAGE, image_bytes, C.IMAGE_ERROR, C.IMAGE_ERROR_MESSAGE),
)


def read_unit(unit: dict, columns: dict, options: dict, block_rows: int) -> Iterator[pa.Table]:
    """The rows of one unit as Arrow tables of at most `block_rows` rows with the internal columns.

    `columns` maps "id", "text", "image" to input column names (or None); only those are read.
    Ids are cast to their id_transport_type. A text or image column this file lacks, or holds with
    an unusable type (see the schema-drift policy above), is not read: its internal column is null
    and the blocks carry that role's error kind and message columns on every row instead, which
    prepare turns into the rows' task errors. Every row of the unit comes out, in order.
    """
    uri, start, stop = unit["uri"], unit["start"], unit["stop"]
    fs, p = open_fs(uri, options)
    try:
        with fs.open(p, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            problems = {role: column_problem(uri, schema, role, columns[role]) for role, *_ in _ROLES if columns.get(role)}
            if columns.get("id") and columns["id"] not in schema.names:
                raise StorageError(f"{uri} has no id column {columns['id']!r} any more: it changed during the run")
            wanted = [c for role in ("id", "text", "image") if (c := columns.get(role)) and problems.get(role) is None]
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
        raise StorageError(f"{uri} has {first + table.num_rows} rows in range, expected {stop}: it changed during the run")
    n = table.num_rows
    if columns.get("id"):
        ids = table.column(columns["id"])
        ids = ids.cast(id_transport_type(ids.type))
    else:
        ids = derived_ids(uri, start, stop)
    out = {C.UNIT: pa.array([unit["key"]] * n, type=pa.string()),
           C.ROW: pa.array(range(start, stop), type=pa.int64()),
           C.ID: ids}
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
    whole = pa.table(out)
    for offset in range(0, whole.num_rows, block_rows):
        yield whole.slice(offset, block_rows)


# ---- output --------------------------------------------------------------------------------


class OutputStore:
    """The output directory: atomic publication, done-markers, cleanup, manifest and report."""

    def __init__(self, path: str, options: dict | None):
        self.uri = path.rstrip("/")
        self.fs, self.root = open_fs(self.uri, options)
        self.root = self.root.rstrip("/")
        self.local = _protocol(self.fs) in _LOCAL_PROTOCOLS

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def part_path(self, key: str) -> str:
        return self.path(f"{PART_PREFIX}{key}.parquet")

    def marker_path(self, key: str) -> str:
        return self.path(DONE_DIR, f"{key}.json")

    # -- writing -------------------------------------------------------------------------------

    def put_atomic(self, path: str, data: bytes) -> None:
        """Make `path` hold `data` in one step: readers see the old object or the whole new one.

        Raises StorageError naming the object, output.path and the fix when the store refuses the
        write or keeps failing after the bounded retries of [storage] (see spec.S3_CONFIG_DEFAULTS).
        """
        try:
            self._put_whole(path, data)
        except Exception as exc:
            raise self.write_error(path, exc) from exc

    def write_error(self, path: str, exc: Exception, action: str = "write") -> StorageError:
        """The error for a failed write (or delete) under output.path: what, why, and the fix."""
        name = path[len(self.root):].lstrip("/") if path.startswith(self.root) else path
        if isinstance(exc, PermissionError):
            fix = ("the store refused it: give this job's credentials write and delete access to output.path (on "
                   "S3: s3:PutObject and s3:DeleteObject on its prefix), or choose an output.path you can write to")
        else:
            fix = ("the store kept failing after the bounded retries (on S3: [storage.s3] config_kwargs retries "
                   "and timeouts); check the store, then run the job again")
        return StorageError(
            f"cannot {action} {name!r} under output.path {self.uri!r} ({type(exc).__name__}: {exc}); {fix}. "
            f"Units committed before this are kept and the next run skips them"
        )

    def _put_whole(self, path: str, data: bytes) -> None:
        if self.local:
            tmp_dir = self.path(TMP_DIR)
            os.makedirs(tmp_dir, exist_ok=True)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{tmp_dir}/{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)  # atomic on one filesystem
        else:
            # Object stores create an object from one request (or a completed multipart upload)
            # atomically; pipe sends the whole bytes, never a stream a failure could cut short.
            self.fs.pipe(path, data)

    def publish(self, key: str, table: pa.Table, compression: str) -> int:
        """Write one unit's rows as its part file; returns the bytes written."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression=None if compression == "none" else compression)
        data = buffer.getvalue()
        self.put_atomic(self.part_path(key), data)
        return len(data)

    def mark_done(self, key: str, stats: dict) -> None:
        """Write the unit's done-marker; call it only after publish() returned (a failed publish
        raises, so no marker ever names a part file that was not written whole)."""
        self.put_atomic(self.marker_path(key), json.dumps(stats, sort_keys=True).encode())

    # -- reading and cleanup -------------------------------------------------------------------

    def _ls(self, path: str) -> list[str]:
        try:
            return [str(p).rstrip("/") for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def done(self) -> dict[str, dict]:
        """Done-markers: unit key -> the counts stored in the marker."""
        names = [p for p in self._ls(self.path(DONE_DIR)) if p.endswith(".json")]

        def read(p: str) -> tuple[str, dict]:
            try:
                stats = json.loads(self.fs.cat_file(p))
            except Exception:
                stats = None  # unreadable marker: treat the unit as not done
            return os.path.basename(p)[: -len(".json")], stats

        with ThreadPoolExecutor(max_workers=16) as pool:
            pairs = list(pool.map(read, names)) if names else []
        return {key: stats for key, stats in pairs if isinstance(stats, dict)}

    def parts(self) -> list[str]:
        """Keys of the part files present."""
        out = []
        for p in self._ls(self.root):
            name = os.path.basename(p)
            if name.startswith(PART_PREFIX) and name.endswith(".parquet"):
                out.append(name[len(PART_PREFIX): -len(".parquet")])
        return out

    def clean_leftovers(self, keep: set[str]) -> int:
        """Delete part files whose key is not in `keep`, and scratch files; returns how many."""
        stale = [self.part_path(k) for k in self.parts() if k not in keep]
        stale += self._ls(self.path(TMP_DIR))
        for p in stale:
            try:
                self.fs.rm(p)
            except FileNotFoundError:
                pass
            except Exception as exc:
                raise self.write_error(p, exc, action="delete") from exc
        return len(stale)

    def probe(self) -> None:
        """Write and delete a small object, so an unwritable output fails before any work."""
        path = self.path(f"_probe-{uuid.uuid4().hex}")
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            self.fs.pipe(path, b"probe")
            self.fs.rm(path)
        except Exception as exc:
            raise StorageError(
                f"output.path {self.uri!r} is not writable ({type(exc).__name__}: {exc}); choose a path you can "
                f"write to, create the bucket, or fix its permissions"
            ) from exc

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path(name)))
        except FileNotFoundError:
            return None

    def write_json(self, name: str, value: dict) -> None:
        self.put_atomic(self.path(name), (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
