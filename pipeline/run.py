"""Run a job: validate it in the driver, start or join Ray, stream the plan, commit units, report.

`run_job(spec, address=None)`:
  1. `validate(spec)` checks everything that can be checked before any GPU work, and fails with
     a JobError naming the fix: the checkpoint (config.json, weights present, tokenizer.model,
     image settings), every input file's footer (columns present with usable types, the same id
     type everywhere), and the output path (a probe object written and deleted; a directory that
     holds another job's outputs is refused).
  2. Lists the done-markers and plans only the missing units (the input of done units is never
     read); deletes scratch files and unmarked part files that belong to no unit of the plan.
  3. Starts a local Ray (or joins `address` / RAY_ADDRESS, or the Ray this process already has),
     refuses an actor pool a local Ray cannot hold (a joined cluster may grow, so there it warns),
     streams the plan of build.py, and commits each unit as soon as all its rows are back:
     rows are deduplicated by (unit, row) first, since Ray may retry work (at-least-once), so each
     input row lands exactly once. See storage.py for the commit protocol.
  4. Writes the report to <output>/_report.json, prints a summary, and returns the report.

Fault hook for tests, never set in production: with the environment variable
T5G2_FAULT_EXIT_AFTER_UNITS=N the driver process exits abruptly (os._exit, no cleanup) right after
committing its N-th unit, as a crash would; the resume tests use it.

Not here: the plan itself (build.py), parsing job files (spec.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C

from . import build, report as reports
from .spec import JobError, JobSpec
from .storage import InputFile, OutputStore, StorageError, Unit, list_inputs, make_units, read_footers

FAULT_ENV = "T5G2_FAULT_EXIT_AFTER_UNITS"
PROGRESS_SECONDS = 10.0
ACTOR_MEMORY_HEADROOM = 1 << 30  # host memory per model actor beyond its weights


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


_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
_BYTES_TYPES = (pa.types.is_binary, pa.types.is_large_binary)


def _check_inputs(spec: JobSpec) -> tuple[list[InputFile], pa.DataType]:
    inp = spec.input
    options = spec.storage_options(inp.paths[0])
    try:
        files = read_footers(list_inputs(inp.paths, options), options)
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    id_type = None
    for f in files:
        names = f.schema.names
        for role, column in (("id_column", inp.id_column), ("text_column", inp.text_column),
                             ("image_column", inp.image_column)):
            if column and column not in names:
                raise JobError(
                    f"input.{role} {column!r} is not a column of {f.uri} (columns: {', '.join(names)}); set "
                    f"input.{role} to one of them"
                )
        if inp.text_column:
            t = f.schema.field(inp.text_column).type
            if not any(check(t) for check in _TEXT_TYPES) and not pa.types.is_null(t):
                raise JobError(f"input.text_column {inp.text_column!r} in {f.uri} has type {t}; it must be a string "
                               f"(or binary UTF-8) column")
        if inp.image_column:
            t = f.schema.field(inp.image_column).type
            ok = any(check(t) for check in _BYTES_TYPES) or pa.types.is_null(t) or (
                pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
                and any(check(t.field("bytes").type) for check in _BYTES_TYPES))
            if not ok:
                raise JobError(f"input.image_column {inp.image_column!r} in {f.uri} has type {t}; it must hold "
                               f"encoded image bytes, or {{bytes, path}} structs as Hugging Face datasets write them")
        if inp.id_column:
            t = f.schema.field(inp.id_column).type
            if pa.types.is_nested(t):
                raise JobError(f"input.id_column {inp.id_column!r} in {f.uri} has nested type {t}; use a string or "
                               f"integer id column, or leave id_column out to derive ids")
            if id_type is None:
                id_type = t
            elif t != id_type:
                raise JobError(f"input.id_column {inp.id_column!r} is {id_type} in {files[0].uri} but {t} in {f.uri}; "
                               f"make the id type the same in every file")
    return files, id_type if id_type is not None else pa.string()


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


def validate(spec: JobSpec) -> Validated:
    """Every check that needs no GPU; raises JobError with the fix."""
    run_hash = spec.run_config_hash()
    image_size, revision, weight_bytes = _check_model(spec)
    files, id_type = _check_inputs(spec)
    try:
        store = OutputStore(spec.output.path, spec.storage_options(spec.output.path))
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    _check_output(spec, store, run_hash)
    units = make_units(files, spec.output.rows_per_file, run_hash)
    return Validated(spec=spec, files=tuple(files), units=tuple(units), id_type=id_type, image_size=image_size,
                     model_revision=revision, run_hash=run_hash, store=store, weight_bytes=weight_bytes)


# ---- running -----------------------------------------------------------------------------------


def _connect(address: str | None) -> bool:
    """Join or start Ray; True when this process started a local Ray (its size is then final)."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    ray.init(include_dashboard=False)
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
    fix = ("lower resources.gpu_actors (or its min), resources.cpus_per_actor / gpus_per_actor, or set "
           "gpus_per_actor = 0 to run on CPU")
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
    )


class Committer:
    """Buffers rows per unit as they stream back; publishes a unit once all its rows are there."""

    def __init__(self, v: Validated, todo: list[Unit]):
        self.v = v
        self.units = {u.key: u for u in todo}
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.stats = reports.RunStats()
        self.duplicates = 0
        self.committed: set[str] = set()
        self.schema = C.output_schema(v.output_columns, v.id_type)
        fault = os.environ.get(FAULT_ENV)
        self.exit_after = int(fault) if fault else None

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
                self.commit(key)

    def commit(self, key: str) -> None:
        table = pa.concat_tables(self.parts.pop(key))
        table = table.take(pc.sort_indices(table, sort_keys=[(C.ROW, "ascending")]))
        table = pa.table([table.column(f.name).cast(f.type) for f in self.schema], schema=self.schema)
        store, compression = self.v.store, self.v.spec.output.compression
        store.publish(key, table, compression)
        stats = reports.unit_stats(table, self.v.output_columns)
        store.mark_done(key, stats)
        self.stats.add(stats)
        del self.seen[key]
        self.committed.add(key)
        if self.exit_after is not None and self.stats.units >= self.exit_after:
            print(f"{FAULT_ENV}={self.exit_after}: exiting abruptly after {self.stats.units} committed units",
                  flush=True)
            os._exit(75)


def run_job(spec: JobSpec, address: str | None = None) -> dict:
    """Run (or resume) a job; returns the run report (also written and printed)."""
    started = time.perf_counter()
    v = validate(spec)
    store = v.store
    done = store.done()
    skipped = reports.RunStats()
    todo = []
    for unit in v.units:
        if unit.key in done:
            skipped.add(done[unit.key])
        else:
            todo.append(unit)
    # A part file without a marker whose unit is about to be recomputed stays until the new one
    # replaces it in one step (same name, same rows), so readers never see its rows vanish;
    # unmarked part files of units no longer in the plan, and scratch files, are deleted.
    store.clean_leftovers(set(done) | {u.key for u in todo})
    rows_in = sum(f.num_rows for f in v.files)
    print(f"Job {spec.origin}: {rows_in} rows in {len(v.files)} file(s) -> {len(v.units)} unit(s); "
          f"{len(v.units) - len(todo)} already done, {len(todo)} to compute", flush=True)

    committer = Committer(v, todo)
    compute_started = time.perf_counter()
    if todo:
        if store.read_json("_job.json") is None:
            store.write_json("_job.json", {"run_config_hash": v.run_hash, "run_config": spec.run_config()})
        _check_capacity(spec, fixed_size=_connect(address))
        ds = build.build_dataset(make_plan(v, todo))
        last = time.perf_counter()
        total_rows = sum(u.rows for u in todo)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            committer.add(batch)
            now = time.perf_counter()
            if now - last >= PROGRESS_SECONDS:
                rate = committer.stats.rows / max(1e-9, now - compute_started)
                print(f"  progress: {committer.stats.units}/{len(todo)} units, {committer.stats.rows}/{total_rows} "
                      f"rows committed, {rate:.1f} rows/s", flush=True)
                last = now
        if committer.committed != set(committer.units):
            raise RuntimeError(
                f"{len(todo) - committer.stats.units} unit(s) did not get all their rows back from the plan; "
                f"nothing of them was committed, so running the job again computes exactly those"
            )
    compute_seconds = time.perf_counter() - compute_started

    result = reports.make_report(
        job=spec.origin, output=spec.output.path, run_config_hash=v.run_hash, provenance=v.provenance,
        rows_in=rows_in, units_total=len(v.units), skipped=skipped, computed=committer.stats,
        wall_seconds=time.perf_counter() - started, compute_seconds=compute_seconds if todo else 0.0,
    )
    if committer.duplicates:
        result["duplicate_rows_dropped"] = committer.duplicates
    store.write_json("_report.json", result)
    print(reports.summary(result), flush=True)
    sys.stdout.flush()
    return result
