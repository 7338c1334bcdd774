"""The output and its exactly-once commit: the output store, and the Committer that fills it.

Why our own commit protocol, and not Ray Data's CheckpointConfig (tried first, ray 2.60):
  * its checkpoint filter runs inside the read operator on an id column of the input, so a job
    without an id column (ids derived from file and row) cannot use it at all;
  * its file sink writes each data file straight to its final name, prefixed by a per-run write
    id, and files of uncommitted ("pending") checkpoints are deleted only by a later run: until
    then, and while a file is being written, readers of the output directory see partial files or
    rows that the rerun writes again under another name (ray PR 61047, ray 55043, s3fs 154);
  * a resume loads every finished id into driver memory and still re-reads all input (ray 60200,
    65891).
  A trial here (8 input files with an id column -> map -> write_parquet, driver killed mid-run)
  confirmed it: the plan wrote its output from one write task at the end, so the kill lost all
  work, and each run named its files with a new write id. So the commit is ours, as below; it
  needs no id column and re-reads no finished input.

Output layout under [output].path, one part file per unit of work (inputs.py names the units):

  part-<key>.parquet     one unit's rows, published whole: written to _tmp/ then renamed (local
                         disks), or sent as one PUT (object stores: a single request creates the
                         object at once, or not at all). No reader ever sees a partial file.
  _done/<key>.json       the done-marker, written after the part file; holds the unit's counts
  _job.json              the run config the directory belongs to; another config is refused
  _report.json           the latest run report
  _changes.json          what the last complete run changed: rows new, changed, unchanged, removed
  _tmp/                  scratch for local renames; emptied at the start of each run

A rerun lists the markers and skips those units without reading their input. A part file without
a marker (a crash between publish and marker) is recomputed and replaced in one step under the
same name, so nothing is ever duplicated and its rows never vanish meanwhile; unmarked part files
of units the job no longer has and scratch files are deleted at the start of a run. Part files
and markers of units the plan no longer has (their file changed, was renamed or removed) are
retracted at the end of a run that committed everything (OutputStore.retract), so after a
successful run the output mirrors the current input: one row per input row, none for rows that
are gone. Readers (pyarrow.dataset, Spark, DuckDB) skip names starting with "_", so they see only
part files.

The Committer buffers the rows of each unit as they stream back from the plan (dropping the
second copy of a row that a retried Ray task produced), with the rows whose output an earlier run
holds (add_reused: the same content, found by its input hash in a unit the input no longer has),
and publishes a unit once all its rows are there. Tests can stop it at each step of a commit
through its `on_step` callback.

Not here: reading the input (inputs.py), the order of a run (run.py).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import columns as C

from . import report as reports
from .inputs import Unit
from .paths import StorageError, family, open_fs

PART_PREFIX = "part-"
DONE_DIR = "_done"
TMP_DIR = "_tmp"
MANIFEST = "_job.json"
REPORT = "_report.json"
COMMIT_STEPS = ("before-publish", "after-publish", "after-done")  # where on_step is called, in order


class OutputStore:
    """The output directory: atomic publication, done-markers, cleanup, manifest and report."""

    def __init__(self, path: str, options: dict | None):
        self.uri = path.rstrip("/")
        self.fs, self.root = open_fs(self.uri, options)
        self.root = self.root.rstrip("/")
        self.local = family(self.fs) == "file"

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
        self._delete(stale)
        return len(stale)

    def _delete(self, paths: list[str]) -> None:
        """Delete each path in order (one already gone is fine); a refused delete names the fix."""
        for p in paths:
            try:
                self.fs.rm(p)
            except FileNotFoundError:
                pass
            except Exception as exc:
                raise self.write_error(p, exc, action="delete") from exc

    def retract(self, keep: set[str], done: dict[str, dict]) -> tuple[int, int]:
        """Delete the part files and done-markers of units not in `keep` (their input changed, was
        renamed or removed); `done` is the markers read at the start of the run. Returns (units, rows)
        retracted. The part file goes first: a crash in between leaves a marker without a part file,
        which the next run retracts too, never a part file that nothing accounts for."""
        stale_parts = {k for k in self.parts() if k not in keep}
        stale_markers = {k for k in done if k not in keep}
        for key in sorted(stale_parts | stale_markers):
            self._delete([self.part_path(key), self.marker_path(key)])
        rows = sum(int((done.get(k) or {}).get("rows", 0)) for k in stale_markers)
        return len(stale_parts | stale_markers), rows

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


class Committer:
    """Buffers rows per unit as they stream back; publishes a unit once all its rows are there."""

    def __init__(self, store: OutputStore, schema: pa.Schema, compression: str, units: list[Unit],
                 output_columns: list[str], *, on_step: Callable[[str, int], None] | None = None,
                 guard: Callable[[], AbstractContextManager] | None = None, notes: dict[str, dict] | None = None):
        """`schema` is the output schema (columns.output_schema), `units` the units to commit, and
        `output_columns` the tasks' columns (for the counts in each done-marker). `on_step(step, n)`
        is called at each step of COMMIT_STEPS of the n-th commit (tests stop the driver there);
        `guard()` is entered around each commit (run.py holds stop signals back inside it); `notes`
        holds what each unit's done-marker records besides its counts (incremental.py's changes)."""
        self.store = store
        self.schema = schema
        self.compression = compression
        self.units = {u.key: u for u in units}
        self.output_columns = list(output_columns)
        self.on_step = on_step
        self.guard = guard or nullcontext
        self.notes = notes or {}
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.reused: dict[str, set[int]] = defaultdict(set)  # rows given by add_reused, per unit
        self.stats = reports.RunStats()  # the rows this run computed
        self.reused_rows = 0  # the rows this run committed from an earlier output (add_reused)
        self.duplicates = 0  # second copies of rows (retried Ray tasks), dropped
        self.committed: set[str] = set()
        self.commits_started = 0

    def add(self, batch: pa.Table) -> None:
        keys = batch.column(C.UNIT).to_pylist()
        rows = batch.column(C.ROW).to_pylist()
        by_unit: dict[str, list[int]] = defaultdict(list)
        for i, (key, row) in enumerate(zip(keys, rows)):
            if key not in self.units:
                raise RuntimeError(f"a row of unknown unit {key} came back from the plan")
            if key in self.committed or row in self.seen[key]:
                self.duplicates += 1  # a retried task's second copy: keep the first
                continue
            self.seen[key].add(row)
            by_unit[key].append(i)
        for key, indices in by_unit.items():
            self.parts[key].append(batch.take(pa.array(indices, type=pa.int64())))
            self._commit_when_whole(key)

    def add_reused(self, key: str, rows: pa.Table) -> None:
        """Rows of unit `key` whose output an earlier run committed (incremental.py): UNIT, ROW and the
        output columns but input_file and input_row, as the finish stage gives them. They are committed
        with the unit like computed rows, and counted apart."""
        numbers = rows.column(C.ROW).to_pylist()
        if key not in self.units or key in self.committed or self.seen[key] & set(numbers):
            raise RuntimeError(f"reused rows for unit {key} that is unknown, committed or holds them already")
        self.seen[key].update(numbers)
        self.reused[key].update(numbers)
        self.parts[key].append(rows)
        self._commit_when_whole(key)

    def _commit_when_whole(self, key: str) -> None:
        if len(self.seen[key]) == self.units[key].rows:
            with self.guard():
                self.commit(key)

    def commit(self, key: str) -> None:
        self.commits_started += 1
        # Computed and reused parts carry the same columns, maybe in another order or type.
        body = pa.schema([pa.field(C.ROW, pa.int64())] + [f for f in self.schema
                                                          if f.name not in (C.INPUT_FILE, C.INPUT_ROW)])
        parts = self.parts.pop(key)
        # The model calls' records ride on their first rows (C.ENGINE, dropped here with the other internal columns).
        engine = reports.engine_totals(r for part in parts if C.ENGINE in part.column_names
                                       for r in part.column(C.ENGINE).to_pylist() if r is not None)
        table = pa.concat_tables([pa.table([part.column(f.name).cast(f.type) for f in body], schema=body)
                                  for part in parts])
        table = table.take(pc.sort_indices(table, sort_keys=[(C.ROW, "ascending")]))
        table = table.append_column(C.INPUT_FILE, pa.array([self.units[key].uri] * table.num_rows, pa.string()))
        table = table.append_column(C.INPUT_ROW, table.column(C.ROW))
        table = pa.table([table.column(f.name).cast(f.type) for f in self.schema], schema=self.schema)
        self._step("before-publish")
        self.store.publish(key, table, self.compression)
        self._step("after-publish")
        calls = {"engine": engine} if engine else {}
        stats = {**reports.unit_stats(table, self.output_columns), **calls}
        self.store.mark_done(key, {**stats, **self.notes.get(key, {})})
        reused = self.reused.pop(key, set())
        if reused:
            mask = pc.invert(pc.is_in(table.column(C.INPUT_ROW), value_set=pa.array(sorted(reused), pa.int64())))
            stats = {**reports.unit_stats(table.filter(mask), self.output_columns), **calls}
            self.reused_rows += len(reused)
        self.stats.add(stats)
        del self.seen[key]
        self.committed.add(key)
        self._step("after-done")

    def _step(self, step: str) -> None:
        if self.on_step is not None:
            self.on_step(step, self.commits_started)
