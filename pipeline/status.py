"""Where an output stands, from what the commit protocol wrote: `t5g2 status OUTPUT_PATH`.

`output_status(path, options=...)` lists the output directory (commit.py's layout: part files,
_done/ markers, _job.json, _report.json), reads the manifest and the latest report, lists the input
again when the report says the output was complete, and names one state:

  empty        nothing of a run is there: no manifest, no part file, no marker, no report (or no
               such directory). A dry run leaves it so.
  in_progress  a run has started and has not completed: no report yet (the first run is running,
               or was killed before it could write one), a report that says the run stopped
               (interrupted by a signal, or failed), or part files or markers newer than the latest
               report (a later run is running, or was killed). Running the job again resumes; which
               of "running now" and "stopped" it is, the output alone cannot tell (the time of the
               newest commit is shown).
  stale        the latest run completed, but the output no longer mirrors it: the input listed now
               is not the input that run read (files added, removed or rewritten: their identities'
               fingerprint differs), the manifest is missing, a marker lacks its part file or a part
               file its marker, or the markers are not the units the run committed. A rerun brings
               it up to date, except where the reason says otherwise.
  complete     the latest run completed, every unit it committed has its marker and part file, and
               the input is the one it read. Error rows are counted (`error_rows`).

Nothing here starts Ray, loads a model or writes anything.

Not here: the commit protocol itself (commit.py), the run (run.py).
"""

from __future__ import annotations

import datetime

from .commit import DONE_DIR, MANIFEST, PART_PREFIX, REPORT, OutputStore
from .inputs import current_identities, inputs_fingerprint
from .paths import StorageError
from .spec import storage_options

STATES = ("complete", "in_progress", "stale", "empty")


def _mtime(info: dict) -> float | None:
    """A listing entry's modification time as POSIX seconds (local mtime, S3 LastModified, ...)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        try:
            return float(value)
        except (TypeError, ValueError):
            try:
                return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _listing(store: OutputStore, path: str) -> dict[str, float | None]:
    """Name -> modification time of the entries under `path` ({} when it does not exist)."""
    try:
        store.fs.invalidate_cache(path)
        entries = store.fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for info in entries:
        name = str(info.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
        out[name] = _mtime(info)
    return out


def _read(store: OutputStore, name: str) -> tuple[dict | None, str | None]:
    """(the JSON object `name`, None) or (None, why it could not be used); (None, None) when absent."""
    try:
        value = store.read_json(name)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"{name} is not valid JSON ({exc})"
    if value is not None and not isinstance(value, dict):
        return None, f"{name} is not a JSON object"
    return value, None


def _when(t: float | None) -> str | None:
    return None if t is None else datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def output_status(path: str, *, options: dict | None = None, storage: dict | None = None,
                  input_paths: tuple[str, ...] | None = None, check_inputs: bool = True) -> dict:
    """The state of the output at `path` and why (see above), as a JSON-able dict.

    `options` are fsspec options for the output's store; `storage` ([storage] tables of a job file)
    gives them instead, as a job's run would, and also the options the input is listed with.
    `input_paths` (a job file's input.path) replaces the paths the report recorded for the input check.
    Raises StorageError when the store cannot be read.
    """
    out_options = storage_options(storage, path) if storage is not None else dict(options or {})
    store = OutputStore(path, out_options)
    try:
        root = _listing(store, store.root)
        done = _listing(store, store.path(DONE_DIR))
        manifest, manifest_problem = _read(store, MANIFEST)
        report, report_problem = _read(store, REPORT)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot read output {path!r} ({type(exc).__name__}: {exc}); check the path, its "
                           f"store options and the credentials") from exc
    parts = {n[len(PART_PREFIX):-len(".parquet")]: t for n, t in root.items()
             if n.startswith(PART_PREFIX) and n.endswith(".parquet")}
    markers = {n[:-len(".json")]: t for n, t in done.items() if n.endswith(".json")}
    status = {
        "output": path, "state": None, "reasons": [], "units_committed": len(markers), "part_files": len(parts),
        "units_total": None, "rows": None, "error_rows": None, "errors_by_kind": None,
        "newest_commit": _when(max((t for t in [*markers.values(), *parts.values()] if t is not None), default=None)),
        "manifest": manifest is not None, "report": None, "inputs": None,
    }

    def finish(state: str, *reasons: str) -> dict:
        status["state"] = state
        status["reasons"] += [r for r in reasons if r]
        return status

    if report is not None:
        status["report"] = {
            "path": f"{path.rstrip('/')}/{REPORT}", "written": _when(root.get(REPORT)), "job": report.get("job"),
            "complete": report.get("complete"), "interrupted": report.get("interrupted"),
            "failed": report.get("failed"), "limit": report.get("limit"),
            "run_config_hash": report.get("run_config_hash"), "wall_seconds": report.get("wall_seconds")}
        status["units_total"] = report.get("units_total")
        status["rows"] = report.get("rows_committed_total")
        errors = (report.get("all_runs") or {}).get("errors_by_kind") or {}
        status["errors_by_kind"] = errors
        status["error_rows"] = sum(errors.values())

    if manifest is None and not parts and not markers and report is None:
        if manifest_problem or report_problem:
            return finish("stale", manifest_problem, report_problem)
        return finish("empty", "no run has written here (no _job.json, no part file, no marker, no report)")
    if manifest is None:
        return finish("stale", manifest_problem or (
            f"the manifest {MANIFEST} is missing: a rerun refuses this directory (its part files belong to no known "
            f"job); restore {MANIFEST}, or delete the output and run the job again"))
    if report is None:
        return finish("in_progress", report_problem, (
            f"no run has finished here yet: {len(markers)} unit(s) committed so far (a run is running now, or stopped "
            f"without writing its report, e.g. killed); running the job again resumes"))

    written = root.get(REPORT)
    newest = max((t for t in [*markers.values(), *parts.values()] if t is not None), default=None)
    if written is not None and newest is not None and newest > written:
        return finish("in_progress", (
            f"units were committed after the latest report ({_when(newest)}, report {_when(written)}): a run is "
            f"running now, or stopped without writing its report; running the job again resumes"))
    if not report.get("complete"):
        why = (f"stopped by {report['interrupted']}" if report.get("interrupted") else
               f"failed: {report['failed']}" if report.get("failed") else "did not commit every unit")
        return finish("in_progress", (
            f"the latest run {why}; {len(markers)} of {report.get('units_total')} unit(s) are committed, and running "
            f"the job again resumes"))

    reasons = []
    if report.get("run_config_hash") != manifest.get("run_config_hash"):
        reasons.append("the latest report belongs to other settings than the manifest's")
    missing_parts = sorted(set(markers) - set(parts))
    if missing_parts:
        reasons.append(f"{len(missing_parts)} unit(s) are marked done but their part file is missing (e.g. "
                       f"{PART_PREFIX}{missing_parts[0]}.parquet); a rerun skips marked units, so delete their markers "
                       f"({DONE_DIR}/KEY.json) and run the job again")
    unmarked = sorted(set(parts) - set(markers))
    if unmarked:
        reasons.append(f"{len(unmarked)} part file(s) have no done-marker (e.g. {PART_PREFIX}{unmarked[0]}.parquet); "
                       f"running the job again recomputes or removes them")
    if report.get("units_total") is not None and len(markers) != report["units_total"]:
        reasons.append(f"{len(markers)} unit(s) are marked done but the latest run committed {report['units_total']}; "
                       f"running the job again brings the output in step")
    recorded = report.get("inputs") or {}
    if check_inputs and recorded.get("fingerprint"):
        paths = tuple(input_paths or recorded.get("paths") or ())
        input_storage = storage if storage is not None else (recorded.get("storage") or {})
        try:
            now = current_identities(paths, storage_options(input_storage, paths[0])) if paths else []
        except StorageError as exc:
            if exc.__cause__ is not None:  # the store failed: say so, do not guess a state
                raise
            now = []  # the paths match no file any more
        fingerprint = inputs_fingerprint(now)
        status["inputs"] = {"paths": list(paths), "files_then": recorded.get("files"), "files_now": len(now),
                            "unchanged": fingerprint == recorded["fingerprint"]}
        if fingerprint != recorded["fingerprint"]:
            reasons.append(f"the input changed since the latest complete run ({recorded.get('files')} file(s) then, "
                           f"{len(now)} now, and their identities differ): running the job again computes what is new "
                           f"and retracts what is gone (`t5g2 run JOB.toml --dry-run` says how much)")
    if reasons:
        return finish("stale", *reasons)
    return finish("complete")


def summary(status: dict) -> str:
    """The status as a person reads it."""
    lines = [f"{status['output']}: {status['state'].replace('_', ' ')}"]
    lines += [f"  why      {r}" for r in status["reasons"] if status["state"] != "complete"]
    report = status.get("report")
    total = status.get("units_total")
    lines.append(f"  units    {status['units_committed']} committed" + (f" of {total}" if total is not None else "")
                 + f", {status['part_files']} part file(s); newest commit {status['newest_commit'] or '-'}")
    if report:
        state = ("complete" if report["complete"] else f"stopped by {report['interrupted']}" if report["interrupted"]
                 else f"failed ({report['failed']})" if report["failed"] else "incomplete")
        lines.append(f"  report   {report['path']}: {state}, written {report['written'] or '-'}, job {report['job']}"
                     + (f", --limit {report['limit']}" if report.get("limit") else ""))
    if status.get("rows") is not None:
        errors = ", ".join(f"{k} {n}" for k, n in (status.get("errors_by_kind") or {}).items()) or "none"
        lines.append(f"  rows     {status['rows']} committed; error rows {status['error_rows']} ({errors})")
    inputs = status.get("inputs")
    if inputs:
        lines.append(f"  inputs   {inputs['files_now']} file(s) now, {inputs['files_then']} at the latest complete "
                     f"run: {'unchanged' if inputs['unchanged'] else 'changed'}")
    return "\n".join(lines)

