"""Run a job: validate it in the driver, start or join Ray, stream the plan, commit units, report.

`run_job(spec, address=None)`:
  1. `validate(spec)` checks everything that can be checked before any GPU work, and fails with
     a JobError naming the fix: the checkpoint (config.json, weights present, tokenizer.model,
     image settings), the input files' footers, and the output path (a probe object written and
     deleted; a directory that holds another job's outputs is refused). Inputs: each named column
     must be usable in at least one file, and the id column in every file with types that cast
     losslessly to one; a file whose text or image column is missing or unusable (schema drift) does
     not fail the job: its rows get column_missing / column_type errors (policy in storage.py), and
     validation warns about it. An output path that the input paths reach is refused. With an id
     column, ids that repeat are found (storage.find_duplicate_ids): duplicate_id error rows, or a
     JobError with input.unique_ids.
  2. Lists the done-markers and plans only the missing units (the input of done units is never
     read); deletes scratch files and unmarked part files that belong to no unit of the plan.
  3. Starts a fresh local Ray (or joins `address` / RAY_ADDRESS once it answers, or the Ray this
     process already has), refuses an actor pool a local Ray cannot hold (a joined cluster may
     grow, so there it warns), streams the plan of build.py, and commits each unit as soon as all
     its rows are back: rows are deduplicated by (unit, row) first, since Ray may retry work
     (at-least-once), so each input row lands exactly once. See storage.py for the commit protocol.
  4. Once every unit is committed, retracts the outputs of units the input no longer has (files
     changed, renamed or removed), so the output mirrors the current input.
  5. Writes the report to <output>/_report.json, prints a summary, and returns the report.
  SIGINT / SIGTERM stop it between two commits (Interrupted): the report says so, stderr says what
  was committed and that the same command resumes.

Fault hook for tests, never set in production: with the environment variable
T5G2_FAULT_EXIT_AT=STEP:N the driver process exits abruptly (os._exit(75), no cleanup), as a crash
would, at STEP of committing the N-th unit of this run: "before-publish" (its part file not yet
written), "after-publish" (part file published, no done-marker yet) or "after-done" (marker
written). The resume and commit-fault tests use it; a malformed value is refused.

Not here: the plan itself (build.py), parsing job files (spec.py).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C

from . import build, report as reports
from .spec import JobError, JobSpec
from .storage import (COLUMN_TYPE, PART_PREFIX, InputFile, OutputStore, StorageError, Unit, column_problem,
                      find_duplicate_ids, id_output_type, id_transport_type, list_inputs, make_units, open_fs,
                      read_footers)

FAULT_ENV = "T5G2_FAULT_EXIT_AT"  # fault hook for tests, never set in production (see above)
FAULT_STEPS = ("before-publish", "after-publish", "after-done")  # the points of Committer.commit
FAULT_EXIT_CODE = 75
PROGRESS_SECONDS = 10.0
ACTOR_MEMORY_HEADROOM = 1 << 30  # host memory per model actor beyond its weights
CONNECT_TIMEOUT_S = 10.0  # how long a cluster address may take to answer before the run fails
INTERRUPTED_EXIT_BASE = 128  # a run stopped by signal N exits with 128 + N, as shells report it


@dataclass(frozen=True)
class Validated:
    """What validation learned: the units, the model facts, the store."""

    spec: JobSpec
    files: tuple[InputFile, ...]
    units: tuple[Unit, ...]
    id_type: pa.DataType
    image_size: int
    model_revision: str | None
    run_hash: str
    store: OutputStore
    weight_bytes: int  # size of the checkpoint's weight files
    drift: tuple[str, ...] = ()  # warnings: input files whose rows get column_missing / column_type errors
    duplicate_rows: int = 0  # rows whose id appeared earlier in the input (duplicate_id error rows)

    @property
    def provenance(self) -> dict:
        return {C.MODEL_SOURCE: self.spec.model.source, C.MODEL_REVISION: self.model_revision,
                C.RUN_CONFIG_HASH: self.run_hash}

    @property
    def output_columns(self) -> list[str]:
        return [t.output_column for t in self.spec.tasks]


# ---- validation --------------------------------------------------------------------------------


def _check_model(spec: JobSpec) -> tuple[int, str | None, int]:
    from model.images import PREPROCESSOR_FILE, ImageProcessor
    from model.source import CheckpointError, CheckpointSource
    from model.tokenizer import Tokenizer
    from model.weights import load_config, weight_files

    source = spec.model.source
    where = f"model.source {source!r}"
    try:
        src = CheckpointSource.open(source, spec.storage_options(source))
        config = load_config(src)
        weight_files(src)
        tokenizer = Tokenizer.from_pretrained(src)
        if any(t.uses_image for t in spec.tasks):
            tokenizer.image_sequence()  # raises when the image token ids are not defined
            if src.exists(PREPROCESSOR_FILE):
                size = ImageProcessor.from_pretrained(src).size
                expected = (config.vision.image_size, config.vision.image_size)
                if size != expected:
                    raise JobError(
                        f"{where}: {PREPROCESSOR_FILE} resizes images to {size[0]}x{size[1]} but the vision tower "
                        f"takes {expected[0]}x{expected[1]}; use the checkpoint's own {PREPROCESSOR_FILE}"
                    )
    except JobError:
        raise
    except (CheckpointError, ValueError, OSError) as exc:
        raise JobError(f"{where} is not a usable checkpoint: {exc}") from exc
    if tokenizer.vocab_size > config.vocab_size:
        raise JobError(f"{where}: tokenizer.model has {tokenizer.vocab_size} ids but the model only "
                       f"{config.vocab_size}; use the tokenizer of this checkpoint")
    try:
        weight_bytes = sum(int(src.fs.size(src.path(name))) for name in weight_files(src))
    except Exception as exc:
        raise JobError(f"{where}: cannot read the size of its weight files ({exc})") from exc
    return config.vision.image_size, src.revision, weight_bytes


def _check_ids(column: str | None, files: list[InputFile]) -> pa.DataType:
    """The output id type; every file must have the id column, its types cast losslessly to one."""
    if not column:
        return pa.string()  # derived ids (storage.derived_ids)
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


def _check_column(spec: JobSpec, role: str, column: str, files: list[InputFile]) -> list[str]:
    """Fail the job when no file has a usable `role` column; else warnings about the files that lack one.

    Files without a usable column are schema drift, handled per row (storage.py): their rows get
    error kind column_missing / column_type in the tasks that read the column.
    """
    setting = f"input.{role}_column"
    problems = [(f, column_problem(f.uri, f.schema, role, column)) for f in files]
    bad = [(f, p) for f, p in problems if p is not None]
    if len(bad) == len(files):
        typed = [p for _, p in bad if p.kind == COLUMN_TYPE]
        if typed:
            raise JobError(f"no input file has a usable {setting}: {typed[0].message}")
        first, names = files[0].uri, ", ".join(files[0].schema.names)
        if len(files) == 1:
            raise JobError(f"{setting} {column!r} is not a column of {first} (columns: {names}); set {setting} to "
                           f"one of them")
        raise JobError(f"{setting} {column!r} is not a column of any of the {len(files)} input files; set {setting} "
                       f"to a column they have (e.g. {first} has: {names})")
    readers = [t.output_column for t in spec.tasks if (t.uses_text if role == "text" else t.uses_image)]
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
            drift += _check_column(spec, role, column, files)
    return files, id_type, drift


def _check_output(spec: JobSpec, store: OutputStore, run_hash: str) -> None:
    try:
        store.probe()
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    manifest = store.read_json("_job.json")
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


def _family(fs) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "file" if protocol in ("file", "local") else protocol


def _check_output_outside_inputs(spec: JobSpec, store: OutputStore, files: list[InputFile]) -> None:
    """Refuse an output directory that the input paths reach: each run would read its own part files
    as input and add their rows again. Checked on the paths as written (a directory that holds the
    output, a glob that would match its part files) and on the files listed (one under the output)."""
    root = store.root.rstrip("/")
    family = _family(store.fs)
    part = f"{root}/{PART_PREFIX}{'0' * 32}.parquet"  # what the output's part files look like

    def refuse(path: str) -> JobError:
        return JobError(
            f"output.path {spec.output.path!r} is inside input.path {path!r}: every run would read its own output as "
            f"input and add its rows again. Choose an output.path outside the input, or narrow input.path to a "
            f"glob (such as .../*.parquet) that does not reach the output's part files")

    for path in spec.input.paths:
        fs, p = open_fs(path, spec.storage_options(path))
        if _family(fs) != family:
            continue
        p = p.rstrip("/")
        if any(ch in p for ch in "*?["):
            if re.match(fsspec.utils.glob_translate(p), part):
                raise refuse(path)
        elif root == p or root.startswith(p + "/"):
            raise refuse(path)
    for f in files:
        fs, p = open_fs(f.uri, spec.storage_options(f.uri))
        if _family(fs) == family and p.startswith(root + "/"):
            raise refuse(f.uri)


def _check_duplicates(spec: JobSpec, files: list[InputFile]) -> dict:
    """Rows that repeat an earlier id (storage.find_duplicate_ids); with input.unique_ids a JobError."""
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
    print(f"warning: {rows} row(s) repeat an earlier id of input.id_column {column!r}; each becomes a duplicate_id "
          f"error row naming the first: {'; '.join(examples)}{more}", file=sys.stderr, flush=True)
    return found


def validate(spec: JobSpec) -> Validated:
    """Every check that needs no GPU; raises JobError with the fix."""
    run_hash = spec.run_config_hash()
    image_size, revision, weight_bytes = _check_model(spec)
    files, id_type, drift = _check_inputs(spec)
    for warning in drift:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    try:
        store = OutputStore(spec.output.path, spec.storage_options(spec.output.path))
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    _check_output_outside_inputs(spec, store, files)
    _check_output(spec, store, run_hash)
    duplicates = _check_duplicates(spec, files)
    units = make_units(files, spec.output.rows_per_file, run_hash, duplicates)
    return Validated(spec=spec, files=tuple(files), units=tuple(units), id_type=id_type, image_size=image_size,
                     model_revision=revision, run_hash=run_hash, store=store, weight_bytes=weight_bytes,
                     drift=tuple(drift), duplicate_rows=sum(len(m) for m in duplicates.values()))


# ---- running -----------------------------------------------------------------------------------


class ClusterError(JobError):
    """The Ray cluster to join does not answer; the message names the address and the fix."""


def _check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within `timeout_s` when nothing listens at a host:port address (ray.init would wait far longer:
    it retries a dead GCS for minutes). Addresses of other forms ("auto") are left to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address.strip())
    if not match:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({type(exc).__name__}: {exc}, within {timeout_s:g} s); start the "
            f"cluster (ray start --head) or fix --address / RAY_ADDRESS, or leave both unset to run on a local Ray"
        ) from exc


def _connect(address: str | None) -> bool:
    """Join or start Ray; True when this process started a local Ray (its size is then final).

    With an address (or RAY_ADDRESS) that cluster is joined, once it answers. Without one, a fresh
    local Ray is started (address="local"): never a cluster Ray recorded on this machine earlier,
    which is what a bare ray.init() would join, and which may be long dead.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(address="local", include_dashboard=False)
    return True


def _check_capacity(spec: JobSpec, fixed_size: bool) -> None:
    """Refuse a pool the cluster cannot hold, instead of waiting forever for it (before any actor starts).

    Besides the actors, at least one CPU must stay free for the read/prepare/finish tasks. A cluster
    we joined may grow (autoscaling), so there a shortfall is only reported.
    """
    import ray

    r = spec.resources
    have = ray.cluster_resources()
    need_cpu = r.min_actors * r.cpus_per_actor + 1
    need_gpu = r.min_actors * r.gpus_per_actor
    problems = []
    if have.get("CPU", 0) < need_cpu:
        problems.append(f"{need_cpu:g} CPUs ({r.min_actors} actor(s) x {r.cpus_per_actor:g} + 1 for the CPU "
                        f"stages) but the cluster has {have.get('CPU', 0):g}")
    if need_gpu and have.get("GPU", 0) < need_gpu:
        problems.append(f"{need_gpu:g} GPUs ({r.min_actors} actor(s) x {r.gpus_per_actor:g}) but the cluster has "
                        f"{have.get('GPU', 0):g}")
    if not problems:
        return
    fix = ("lower resources.gpu_actors (or its min), resources.cpus_per_actor or resources.gpus_per_actor, or "
           "set resources.gpus_per_actor = 0 to run on CPU")
    message = f"the job needs {' and '.join(problems)}; {fix}"
    if fixed_size:
        raise JobError(message)
    print(f"warning: {message} (waiting for the cluster to grow)", file=sys.stderr, flush=True)


def make_plan(v: Validated, todo: list[Unit]) -> build.Plan:
    spec = v.spec
    model_options = spec.storage_options(spec.model.source)
    columns = {"id": spec.input.id_column, "text": spec.input.text_column if any(t.uses_text for t in spec.tasks)
               else None, "image": spec.input.image_column if any(t.uses_image for t in spec.tasks) else None}
    r = spec.resources
    return build.Plan(
        units=tuple(todo),
        read=build.ReadSettings(columns=columns, storage_options=spec.storage_options(spec.input.paths[0]),
                                block_rows=min(r.rows_per_call, 1024)),
        prepare=build.PrepareSettings(source=spec.model.source, storage_options=model_options,
                                      tasks=build.prompt_tasks(spec.tasks),
                                      max_input_tokens=spec.input.max_input_tokens,
                                      long_input=spec.input.long_input, image_size=v.image_size),
        finish=build.FinishSettings(source=spec.model.source, storage_options=model_options,
                                    output_columns=tuple(v.output_columns), provenance=v.provenance),
        infer_kwargs=dict(source=spec.model.source, dtype=spec.model.dtype, tasks=build.infer_tasks(spec.tasks),
                          max_batch_tokens=r.max_batch_tokens, storage_options=model_options),
        min_actors=r.min_actors,
        max_actors=r.max_actors,
        gpus_per_actor=r.gpus_per_actor,
        cpus_per_actor=r.cpus_per_actor,
        rows_per_call=r.rows_per_call,
        # The weights as stored (the largest form they take in host memory) plus headroom.
        actor_memory_bytes=v.weight_bytes + ACTOR_MEMORY_HEADROOM,
        call_timeout_s=r.call_timeout_s,
    )


class Committer:
    """Buffers rows per unit as they stream back; publishes a unit once all its rows are there."""

    def __init__(self, v: Validated, todo: list[Unit], signals: "_StopOnSignals | None" = None):
        self.v = v
        self.signals = signals  # holds a stop signal back while a unit is being committed
        self.units = {u.key: u for u in todo}
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.stats = reports.RunStats()
        self.duplicates = 0
        self.committed: set[str] = set()
        self.schema = C.output_schema(v.output_columns, v.id_type)
        self.commits_started = 0
        self.fault = self._fault_point(os.environ.get(FAULT_ENV))

    @staticmethod
    def _fault_point(value: str | None) -> tuple[str, int] | None:
        """(step, n) from the test fault hook's value "STEP:N", or None when it is unset."""
        if not value:
            return None
        step, _, n = value.partition(":")
        if step not in FAULT_STEPS or not n.isdigit() or int(n) < 1:
            raise RuntimeError(f"{FAULT_ENV}={value!r} must be STEP:N with STEP one of {', '.join(FAULT_STEPS)} "
                               f"and N >= 1 (a fault hook for tests; unset it)")
        return step, int(n)

    def _maybe_crash(self, step: str) -> None:
        """The test fault hook: die here, as a killed driver would, without any cleanup."""
        if self.fault == (step, self.commits_started):
            print(f"{FAULT_ENV}={step}:{self.commits_started}: exiting abruptly", flush=True)
            os._exit(FAULT_EXIT_CODE)

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
            if len(self.seen[key]) == self.units[key].rows:
                if self.signals is None:
                    self.commit(key)
                else:
                    with self.signals.commit():
                        self.commit(key)

    def commit(self, key: str) -> None:
        self.commits_started += 1
        table = pa.concat_tables(self.parts.pop(key))
        table = table.take(pc.sort_indices(table, sort_keys=[(C.ROW, "ascending")]))
        table = table.append_column(C.INPUT_FILE, pa.array([self.units[key].uri] * table.num_rows, pa.string()))
        table = table.append_column(C.INPUT_ROW, table.column(C.ROW))
        table = pa.table([table.column(f.name).cast(f.type) for f in self.schema], schema=self.schema)
        store, compression = self.v.store, self.v.spec.output.compression
        self._maybe_crash("before-publish")
        store.publish(key, table, compression)
        self._maybe_crash("after-publish")
        stats = reports.unit_stats(table, self.v.output_columns)
        store.mark_done(key, stats)
        self.stats.add(stats)
        del self.seen[key]
        self.committed.add(key)
        self._maybe_crash("after-done")


def _stuck_model_message(exc: Exception, spec: JobSpec, committed: str) -> str | None:
    """What to tell the user when the plan failed because model calls kept dying or nothing moved.

    None for any other failure, which is raised as it is.
    """
    import ray.data.exceptions
    import ray.exceptions

    no_progress_error = getattr(ray.data.exceptions, "ExecutionTimeoutError", ())  # Ray Data's own guard, if any
    timeout = spec.resources.call_timeout_s
    kept = (f"{committed} units were committed and stay; running the job again computes only the rest "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if isinstance(exc, no_progress_error):
        return (f"the job stopped: nothing moved through the pipeline for longer than its no-progress bound "
                f"({build.NO_PROGRESS_CALLS} x resources.call_timeout_s = {build.NO_PROGRESS_CALLS * timeout:g} s, "
                f"and never below Ray Data's "
                f"execution_no_progress_timeout_s). A model actor is stuck where its hang guard cannot stop it "
                f"(a frozen process, an actor that never starts or never loads the model) or the cluster cannot "
                f"place the actors; check the Ray worker logs. {kept}")
    if isinstance(exc, ray.exceptions.RayActorError):
        return (f"the job stopped: a model call could not be completed because its actor process kept dying "
                f"(a call is tried {build.CALL_RETRIES + 1} times at most, each time on a restarted actor). Either "
                f"the actor crashed (a GPU fault, host memory: see the Ray worker logs), or the call ran longer "
                f"than resources.call_timeout_s = {timeout:g} s and the hang guard stopped it (the worker log then "
                f"says '{build.HANG_GUARD_MESSAGE}: ...'); if calls really take that long, raise "
                f"resources.call_timeout_s or lower resources.rows_per_call. {kept}")
    return None


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the driver (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it). `exit_code` is 128 + the signal's number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = INTERRUPTED_EXIT_BASE + signum


class _StopOnSignals:
    """While active, SIGINT and SIGTERM raise Interrupted in the driver's main thread; one that arrives
    while a unit is being committed is held until that commit is over, so a stop never lands between
    a part file and its marker (that would be safe, only wasteful: the rerun would redo the unit)."""

    def __init__(self):
        self.committing = False
        self.pending: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.committing:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextmanager
    def active(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread (e.g. a notebook worker)
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def take_back(self) -> None:
        """Install the handlers again: ray.init puts its own SIGTERM handler in the driver (Ray's core
        worker logs the signal and exits with status 15), which would skip the clean stop."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handle)

    @contextmanager
    def commit(self):
        self.committing = True
        try:
            yield
        finally:
            self.committing = False
        if self.pending is not None:
            raise Interrupted(self.pending)


def run_job(spec: JobSpec, address: str | None = None) -> dict:
    """Run (or resume) a job; returns the run report (also written and printed).

    SIGINT or SIGTERM stops it: what was committed stays, the report is written with "interrupted",
    a line on stderr says how much is done and that running the same command again resumes, and
    Interrupted is raised (the command line exits with its exit_code).
    """
    signals = _StopOnSignals()
    with signals.active():
        return _run(spec, address, signals)


def _run(spec: JobSpec, address: str | None, signals: _StopOnSignals) -> dict:
    started = time.perf_counter()
    try:
        v = validate(spec)
    except Interrupted as stop:
        print(f"t5g2 run: stopped by {stop.name} during validation, before any work; nothing was written",
              file=sys.stderr, flush=True)
        raise
    store = v.store
    done = store.done()
    skipped = reports.RunStats()
    todo = []
    for unit in v.units:
        if unit.key in done:
            skipped.add(done[unit.key])
        else:
            todo.append(unit)
    plan_keys = {u.key for u in v.units}
    # A part file without a marker whose unit is about to be recomputed stays until the new one
    # replaces it in one step (same name, same rows), so readers never see its rows vanish;
    # unmarked part files of units no longer in the plan, and scratch files, are deleted. Marked
    # units no longer in the plan are retracted only at the end of a run that committed everything.
    store.clean_leftovers(set(done) | {u.key for u in todo})
    rows_in = sum(f.num_rows for f in v.files)
    print(f"Job {spec.origin}: {rows_in} rows in {len(v.files)} file(s) -> {len(v.units)} unit(s); "
          f"{len(v.units) - len(todo)} already done, {len(todo)} to compute", flush=True)

    committer = Committer(v, todo, signals)
    compute_started = time.perf_counter()
    connected_here = False
    retracted = (0, 0)

    def report(interrupted: str | None = None) -> dict:
        result = reports.make_report(
            job=spec.origin, output=spec.output.path, run_config_hash=v.run_hash, provenance=v.provenance,
            rows_in=rows_in, units_total=len(v.units), skipped=skipped, computed=committer.stats,
            retracted_units=retracted[0], retracted_rows=retracted[1], wall_seconds=time.perf_counter() - started,
            compute_seconds=time.perf_counter() - compute_started if todo else 0.0, interrupted=interrupted)
        if committer.duplicates:
            result["duplicate_rows_dropped"] = committer.duplicates
        store.write_json("_report.json", result)
        return result

    try:
        if todo:
            if store.read_json("_job.json") is None:
                store.write_json("_job.json", {"run_config_hash": v.run_hash, "run_config": spec.run_config()})
            connected_here = not _ray_initialized()
            fixed_size = _connect(address)
            signals.take_back()
            _check_capacity(spec, fixed_size=fixed_size)
            _stream(spec, v, todo, committer, compute_started)
        retracted = store.retract(plan_keys, done)
    except Interrupted as stop:
        result = report(interrupted=stop.name)
        units_done = result["units_reused"] + result["units_computed"]
        print(f"t5g2 run: stopped by {stop.name}: {committer.stats.units} of {len(todo)} units committed in this "
              f"run ({committer.stats.rows} rows); {units_done} of {len(v.units)} units are done in all. Everything "
              f"committed stays: run the same command again to resume, it computes only the rest",
              file=sys.stderr, flush=True)
        if connected_here:
            _disconnect()  # stops this driver's Ray job: its actors and tasks end with it
        raise

    result = report()
    print(reports.summary(result), flush=True)
    sys.stdout.flush()
    return result


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def _disconnect() -> None:
    import ray

    try:
        ray.shutdown()
    except Exception:  # already going down with the interrupted run: nothing more to save
        pass


def _stream(spec: JobSpec, v: Validated, todo: list[Unit], committer: "Committer", compute_started: float) -> None:
    """Stream the plan through the committer until every unit of `todo` is committed."""
    if not sys.stdout.isatty():
        # Off a terminal (batch logs, CI), Ray Data logs a block of lines per operator every few
        # seconds; the one-line progress below says what a job log needs.
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    ds = build.build_dataset(make_plan(v, todo))
    last = time.perf_counter()
    total_rows = sum(u.rows for u in todo)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            committer.add(batch)
            now = time.perf_counter()
            if now - last >= PROGRESS_SECONDS:
                rate = committer.stats.rows / max(1e-9, now - compute_started)
                print(f"  progress: {committer.stats.units}/{len(todo)} units, {committer.stats.rows}/"
                      f"{total_rows} rows committed, {rate:.1f} rows/s", flush=True)
                last = now
    except Exception as exc:
        why = _stuck_model_message(exc, spec, f"{committer.stats.units}/{len(todo)}")
        if why is None:
            raise
        raise RuntimeError(why) from exc
    if committer.committed != set(committer.units):
        raise RuntimeError(
            f"{len(todo) - committer.stats.units} unit(s) did not get all their rows back from the plan; "
            f"nothing of them was committed, so running the job again computes exactly those"
        )
