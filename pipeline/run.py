"""Run a job: validate it, start or join Ray, stream the plan, commit units, retract, report.

`run_job(spec, address=None)`:
  1. `validate(spec)` (validate.py) checks everything that can be checked before any GPU work and
     fails with a JobError naming the fix.
  2. Lists the done-markers and plans only the missing units (the input of done units is never
     read); deletes scratch files and unmarked part files that belong to no unit of the plan.
  3. Starts a fresh local Ray (or joins `address` / RAY_ADDRESS once it answers, or the Ray this
     process already has), refuses an actor pool a local Ray cannot hold (a joined cluster may
     grow, so there it warns), streams the plan of build.py, and commits each unit as soon as all
     its rows are back (commit.py): rows are deduplicated by (unit, row) first, since Ray may retry
     work (at-least-once), so each input row lands exactly once.
     Rows of new units whose result a unit the input no longer has already holds (same input hash:
     a renamed, moved or re-sharded file, the unchanged rows of an edited one) are not computed: their
     result is copied (incremental.py).
  4. Once every unit is committed, writes what changed (<output>/_changes.json) and retracts the
     outputs of units the input no longer has (files changed, renamed or removed), so the output
     mirrors the current input.
  5. Writes the report to <output>/_report.json, prints a summary, and returns the report.
  SIGINT / SIGTERM stop it between two commits (Interrupted): the report says so, the log says what
  was committed and that the same command resumes. A run that fails under it (model actors that keep
  dying, rows that never come back: InfrastructureError; Ray's own errors) writes the report with
  "failed" before the error goes on; one that failed on the output store writes none (the store
  has just refused, and a further write could take minutes of retries to fail again).

`run_job(spec, limit=N)` runs the job on its first N rows only, into an output of their own under
the job's output (limited_spec): a prompt is checked on a few rows, and nothing of it can be taken
for the job's output.

Tests reach inside a run only through RunHooks (a model actor class that injects faults, a callback
at each commit step); production code never sets them, and imports no test hook.

Not here: the checks (validate.py), the plan (build.py), the commit protocol (commit.py).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

from operators import columns as C

from . import build, incremental
from . import report as reports
from .commit import MANIFEST, REPORT, Committer
from .inputs import Unit, first_rows, inputs_fingerprint
from .paths import StorageError, family
from .spec import JobError, JobSpec
from .validate import Validated, validate

PROGRESS_SECONDS = 10.0
ACTOR_MEMORY_HEADROOM = 1 << 30  # host memory per model actor beyond its weights
CONNECT_TIMEOUT_S = 10.0  # how long a cluster address may take to answer before the run fails
INTERRUPTED_EXIT_BASE = 128  # a run stopped by signal N exits with 128 + N, as shells report it
LIMIT_DIR = "_limit"  # `--limit N` outputs live under <output>/_limit/<run hash>/ (readers skip "_" names)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunHooks:
    """Ways for tests to reach inside a run; production leaves them unset."""

    actor_cls: type | None = None  # a subclass of build.InferActor run as the model actor (fault injection)
    on_commit_step: Callable[[str, int], None] | None = None  # called at each commit.COMMIT_STEPS step


class ClusterError(JobError):
    """The Ray cluster to join does not answer; the message names the address and the fix."""


class InfrastructureError(RuntimeError):
    """The run stopped because what it runs on failed (model actors that kept dying or hung, a plan
    that lost rows); the message says what and that committed units stay. Not the job's fault: the
    same command, run again, resumes."""


def limited_spec(spec: JobSpec) -> JobSpec:
    """The job with its output moved to <output.path>/_limit/<run config hash>/, where `--limit N` runs
    write: never the job's own output (readers, reruns and `t5g2 status` of the job's output skip names
    that start with "_"), one directory per set of settings, so trying another prompt on the first rows
    never meets the output of the one before, and the same settings rerun resume there. The hash is the
    one validation will find: with an adapter, its files' identity is resolved first (resolved_spec)."""
    spec = resolved_spec(spec)
    path = f"{spec.output.path.rstrip('/')}/{LIMIT_DIR}/{spec.run_config_hash()[:16]}"
    return replace(spec, output=replace(spec.output, path=path))


def resolved_spec(spec: JobSpec) -> JobSpec:
    """`spec` with what validation resolves into the run config (the adapter's identity), checked as
    validation checks it; the spec itself when there is no adapter."""
    from .validate import _check_adapter, _check_model

    if not spec.model.adapter or spec.model.adapter_identity:
        return spec
    _, identity = _check_adapter(spec, _check_model(spec).config)
    return replace(spec, model=replace(spec.model, adapter_identity=identity))


def apply_limit(v: Validated, limit: int | None) -> Validated:
    """`v` restricted to the first `limit` rows of its input, in (file, row) order (None: all)."""
    if limit is None:
        return v
    files, units = first_rows(list(v.files), list(v.units), limit, v.run_hash)
    return replace(v, files=tuple(files), units=tuple(units))


def inputs_record(v: Validated) -> dict:
    """What the run report says about the input it read (before any --limit): the paths as written, the
    files, a fingerprint of their identities, and the [storage] tables to list them again with."""
    return {"paths": list(v.spec.input.paths), "files": len(v.files),
            "fingerprint": inputs_fingerprint([(f.uri, f.identity) for f in v.files]),
            "storage": v.spec.storage}


def report_location(output_path: str) -> str:
    """Where the report of an output lives, as `t5g2 run` prints it: an absolute path on local disks,
    the URI elsewhere."""
    from .paths import open_fs

    fs, root = open_fs(output_path.rstrip("/"), None)
    if family(fs) == "file":
        return os.path.join(os.path.abspath(root), REPORT)
    return f"{output_path.rstrip('/')}/{REPORT}"


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
    # Ray's own driver messages follow the "ray" logger's level when the caller set one (the command
    # line quiets Ray's INFO on a terminal); ray.init would otherwise reset it to INFO.
    level = logging.getLogger("ray").level or logging.INFO
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True, logging_level=level)
        return False
    ray.init(address="local", include_dashboard=False, logging_level=level)
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
    log.warning(f"{message} (waiting for the cluster to grow)")


def read_columns(spec: JobSpec) -> dict:
    """The input columns the read stage gives: "id" / "text" / "image" -> column name or None."""
    return {"id": spec.input.id_column, "text": spec.input.text_column if any(t.uses_text for t in spec.tasks)
            else None, "image": spec.input.image_column if any(t.uses_image for t in spec.tasks) else None}


def make_plan(v: Validated, todo: list[Unit]) -> build.Plan:
    spec = v.spec
    model_options = spec.storage_options(spec.model.source)
    columns = read_columns(spec)
    r = spec.resources
    keep = spec.output.keep_columns
    return build.Plan(
        units=tuple(todo),
        read=build.ReadSettings(columns=columns, storage_options=spec.storage_options(spec.input.paths[0]),
                                block_rows=min(r.rows_per_call, 1024), extra=v.extra),
        prepare=build.PrepareSettings(source=spec.model.source, storage_options=model_options,
                                      tasks=build.prompt_tasks(spec.tasks),
                                      max_input_tokens=spec.input.max_input_tokens,
                                      long_input=spec.input.long_input, keep=keep),
        finish=build.FinishSettings(source=spec.model.source, storage_options=model_options,
                                    tasks=build.finish_tasks(spec.tasks), provenance=v.provenance, keep=keep),
        infer=build.InferSettings(source=spec.model.source, dtype=spec.model.dtype,
                                  tasks=build.infer_tasks(spec.tasks), max_batch_tokens=r.max_batch_tokens,
                                  storage_options=model_options, gpus_per_actor=r.gpus_per_actor,
                                  cpus=r.cpus_per_actor, call_timeout_s=r.call_timeout_s, keep=keep,
                                  adapter=spec.model.adapter,
                                  adapter_storage_options=spec.storage_options(spec.model.adapter)
                                  if spec.model.adapter else {}),
        min_actors=r.min_actors,
        max_actors=r.max_actors,
        cpus_per_actor=r.cpus_per_actor,
        rows_per_call=r.rows_per_call,
        # The weights as stored (the largest form they take in host memory) plus headroom.
        actor_memory_bytes=v.weight_bytes + ACTOR_MEMORY_HEADROOM,
    )


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

    def _handle(self, signum, _frame) -> None:
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


def run_job(spec: JobSpec, address: str | None = None, hooks: RunHooks | None = None,
            limit: int | None = None) -> dict:
    """Run (or resume) a job; returns the run report (also written and printed).

    With `limit`, only the first `limit` rows, into limited_spec's output. SIGINT or SIGTERM stops it:
    what was committed stays, the report is written with "interrupted", an error is logged saying how
    much is done and that running the same command again resumes, and Interrupted is raised (the
    command line exits with its exit_code). An error that stops the run after validation carries the
    report written for it, if any, as its `report` attribute (Interrupted too). Progress, warnings and
    the summary go to the "pipeline" loggers (the command line prints them).
    """
    if limit is not None:
        if limit < 1:
            raise JobError(f"--limit must be a number of rows >= 1, got {limit}")
        spec = limited_spec(spec)
    signals = _StopOnSignals()
    with signals.active():
        return _run(spec, address, signals, hooks or RunHooks(), limit)


def _run(spec: JobSpec, address: str | None, signals: _StopOnSignals, hooks: RunHooks, limit: int | None) -> dict:
    started = time.perf_counter()
    try:
        v = validate(spec)
    except Interrupted as stop:
        log.error(f"stopped by {stop.name} during validation, before any work; nothing was written")
        raise
    spec = v.spec  # with what validation resolved (the adapter's identity, part of the run config)
    inputs = inputs_record(v)
    v = apply_limit(v, limit)
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
    stale = {key for key in done if key not in plan_keys}  # committed units the input no longer has
    # A part file without a marker whose unit is about to be recomputed stays until the new one
    # replaces it in one step (same name, same rows), so readers never see its rows vanish;
    # unmarked part files of units no longer in the plan, and scratch files, are deleted. Marked
    # units no longer in the plan are reused from (incremental.py), then retracted only at the end of
    # a run that committed everything.
    store.clean_leftovers(set(done) | {u.key for u in todo})
    rows_in = sum(f.num_rows for f in v.files)
    if limit is not None:
        log.info(f"--limit {limit}: the first {rows_in} rows only, into {spec.output.path} (an output of their own, "
                 f"not the job's)")
    log.info(f"Job {spec.origin}: {rows_in} rows in {len(v.files)} file(s) -> {len(v.units)} unit(s); "
             f"{len(v.units) - len(todo)} already done, {len(todo)} to compute")

    committer = Committer(v.store, C.output_schema(v.output_tasks, v.id_type, list(v.keep)), spec.output.compression,
                          todo,
                          v.output_columns, on_step=hooks.on_commit_step, guard=signals.commit)
    compute_started = time.perf_counter()
    connected_here = False
    retracted = (0, 0)
    changes = None

    def report(interrupted: str | None = None, failed: str | None = None) -> dict:
        result = reports.make_report(
            job=spec.origin, output=spec.output.path, run_config_hash=v.run_hash, provenance=v.provenance,
            rows_in=rows_in, units_total=len(v.units), skipped=skipped, computed=committer.stats,
            retracted_units=retracted[0], retracted_rows=retracted[1], wall_seconds=time.perf_counter() - started,
            compute_seconds=time.perf_counter() - compute_started if todo else 0.0, interrupted=interrupted,
            failed=failed, limit=limit, inputs=inputs, duplicate_rows_dropped=committer.duplicates,
            reused_rows=committer.reused_rows, changes=changes)
        store.write_json(REPORT, result)
        return result

    try:
        generation, counted = incremental.generation_of(store)
        read = incremental.ReadSpec(columns=read_columns(spec), storage_options=spec.storage_options(
            spec.input.paths[0]), extra=v.extra)
        reuse = incremental.plan_reuse(store, todo, stale, read, generation, counted)
        committer.notes = reuse.notes
        if todo and store.read_json(MANIFEST) is None:
            store.write_json(MANIFEST, {"run_config_hash": v.run_hash, "run_config": spec.run_config()})
        for key, piece in reuse.pieces:  # units whose rows are all reused are committed here
            committer.add_reused(key, piece)
        compute = [u for u in reuse.units if u.key not in committer.committed]
        if compute:
            connected_here = not _ray_initialized()
            fixed_size = _connect(address)
            signals.take_back()
            _check_capacity(spec, fixed_size=fixed_size)
            _stream(spec, v, compute, committer, compute_started, hooks)
        changes = incremental.changes_record(store, list(v.units), done, committer.committed, reuse,
                                             read.derived_id, stale, v.run_hash)
        store.write_json(incremental.CHANGES, changes)  # before retracting: see changes_record
        retracted = store.retract(plan_keys, done)
    except Interrupted as stop:
        result = report(interrupted=stop.name)
        units_done = result["units_reused"] + result["units_computed"]
        log.error(f"stopped by {stop.name}: {committer.stats.units} of {len(todo)} units committed in this run "
                  f"({committer.stats.rows + committer.reused_rows} rows); {units_done} of {len(v.units)} units are "
                  f"done in all. Everything committed stays: run the same command again to resume, it computes only "
                  f"the rest")
        if connected_here:
            _disconnect()  # stops this driver's Ray job: its actors and tasks end with it
        stop.report = result
        raise
    except Exception as exc:
        # After a storage failure the store is not written again; a JobError (a pool the cluster cannot
        # hold, a cluster that does not answer) stops the run before any work, and leaves the output as it was.
        if not isinstance(exc, (StorageError, JobError)):
            try:
                exc.report = report(failed=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            except Exception as also:  # the report is a courtesy here; the failure itself goes on
                log.warning(f"could not write the run report after the failure ({type(also).__name__}: {also})")
        raise

    result = report()
    log.info(reports.summary(result))
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


def _stream(spec: JobSpec, v: Validated, todo: list[Unit], committer: Committer, compute_started: float,
            hooks: RunHooks) -> None:
    """Stream the plan through the committer until every unit of `todo` is committed."""
    if not sys.stdout.isatty():
        # Off a terminal (batch logs, CI), Ray Data logs a block of lines per operator every few
        # seconds; the one-line progress below says what a job log needs.
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    ds = build.build_dataset(make_plan(v, todo), actor_cls=hooks.actor_cls or build.InferActor)
    last = time.perf_counter()
    total_rows = sum(u.rows - len(u.reused) for u in todo)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            committer.add(batch)
            now = time.perf_counter()
            if now - last >= PROGRESS_SECONDS:
                rate = committer.stats.rows / max(1e-9, now - compute_started)
                log.info(f"  progress: {committer.stats.units}/{len(todo)} units, {committer.stats.rows}/"
                         f"{total_rows} rows committed, {rate:.1f} rows/s")
                last = now
    except Exception as exc:
        why = _stuck_model_message(exc, spec, f"{committer.stats.units}/{len(todo)}")
        if why is None:
            raise
        raise InfrastructureError(why) from exc
    if committer.committed != set(committer.units):
        raise InfrastructureError(
            f"{len(todo) - committer.stats.units} unit(s) did not get all their rows back from the plan; "
            f"nothing of them was committed, so running the job again computes exactly those"
        )
