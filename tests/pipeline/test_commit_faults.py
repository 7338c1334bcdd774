"""Faults at every step of the exactly-once commit, and writes that die half way (issue #5, points 2, 3).

Driver death: a driver process joins the session's Ray and is killed (tests/helpers/crash_driver.py:
os._exit from the run's commit-step callback) before a unit's part file is published, after it is published but
before its done-marker, or after the marker. The rerun must leave exactly one row per id, no
unmarked part file and no scratch, and must not recompute what was recorded done.

Partial writes: a Parquet writer that dies half way through a part file (locally and on S3), a
local disk that refuses the second half of a file, and an S3 upload that fails, must leave nothing
at the final name and no marker, and a rerun must repair it. The same half-way failure through a
naive `fs.open(final, "wb")` write is shown to leave half a file visible (on S3 too: s3fs uploads
the buffer when the `with` block closes, even on an exception), so the check is known to catch it.

Not here: end-to-end resume over many crashes (test_run.py), the storage unit tests (test_storage.py).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from helpers.committing import bench, committer, finished_rows, part_ids, unit_ids
from helpers.crash_driver import CRASH_EXIT_CODE
from helpers.pipeline_data import job_toml, mixed_rows, write_inputs
from operators import columns as C
from pipeline.commit import COMMIT_STEPS, DONE_DIR, TMP_DIR
from pipeline.run import run_job
from pipeline.spec import load_job

REPO = Path(__file__).resolve().parents[2]
TEXT_ONLY = """
[[task]]
kind = "summarize"
max_new_tokens = 2
"""


# ---- driver death at each step of a commit ---------------------------------------------------


def _state(out: Path) -> dict[str, dict]:
    """What the output directory holds: part and marker files (key -> stat), and scratch files."""
    parts = {p.name[len("part-"):-len(".parquet")]: p.stat() for p in out.glob("part-*.parquet")}
    markers = {p.stem: p.stat() for p in (out / DONE_DIR).glob("*.json")}
    scratch = sorted(p.name for p in (out / TMP_DIR).iterdir()) if (out / TMP_DIR).exists() else []
    return {"parts": parts, "markers": markers, "scratch": scratch}


def _ids_of_all_parts(out: Path) -> list:
    return [i for p in sorted(out.glob("part-*.parquet")) for i in pq.read_table(p).column(C.ID).to_pylist()]


# A driver run costs ~15 s here: the step whose crash leaves an unmarked part file runs by default;
# the others (after-done is also what test_run.py's resume test kills at) run nightly. Crashing at
# the second commit leaves one unit recorded done, whose files must survive the rerun untouched;
# before-publish also crashes at the first, before any output at all is published.
@pytest.mark.parametrize("step, crash_at", [
    pytest.param(s, n, marks=[] if s == "after-publish" else [pytest.mark.slow], id=f"{s}:{n}")
    for s, n in [(COMMIT_STEPS[0], 1)] + [(s, 2) for s in COMMIT_STEPS]])
def test_driver_killed_at_each_commit_step_resumes_exactly_once(step, crash_at, ray_cluster, tiny_checkpoint,
                                                                 tmp_path):
    rows = mixed_rows(good=12)[0][:12]
    write_inputs(rows, str(tmp_path / "in"), files=2)  # 2 files x 6 rows -> 6 units of 2 rows
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out), tasks=TEXT_ONLY,
                            rows_per_file=2))
    proc = subprocess.run([sys.executable, "-m", "helpers.crash_driver", f"{step}:{crash_at}", str(job), ray_cluster],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == CRASH_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-4000:]

    crashed = _state(out)
    done_before = crash_at if step == "after-done" else crash_at - 1
    published_before = crash_at - 1 if step == "before-publish" else crash_at
    assert len(crashed["markers"]) == done_before
    assert len(crashed["parts"]) == published_before
    assert set(crashed["markers"]) <= set(crashed["parts"])  # a marker is only ever written after its part
    # A reader of the crashed output sees whole files only.
    assert pads.dataset(str(out), format="parquet").to_table().num_rows == 2 * published_before
    unmarked = set(crashed["parts"]) - set(crashed["markers"])
    assert len(unmarked) == (1 if step == "after-publish" else 0)

    report = run_job(load_job(str(job)))

    # Exactly one row per id across all part files; no unmarked part, no scratch.
    ids = _ids_of_all_parts(out)
    assert sorted(ids) == sorted(r["id"] for r in rows)
    after = _state(out)
    assert set(after["parts"]) == set(after["markers"]) and len(after["parts"]) == report["units_total"] == 6
    assert after["scratch"] == []
    # What was recorded done was not recomputed (same files, untouched); the rest was.
    assert report["units_reused"] == done_before and report["rows_skipped"] == 2 * done_before
    assert report["units_computed"] == 6 - done_before and report["rows_out"] == 12 - 2 * done_before
    assert report["complete"]
    for key in crashed["markers"]:
        for kind in ("parts", "markers"):
            was, now = crashed[kind][key], after[kind][key]
            assert (was.st_ino, was.st_mtime_ns) == (now.st_ino, now.st_mtime_ns), (kind, key)
    for key in unmarked:  # published but not recorded done: computed again, replaced in one step
        assert after["parts"][key].st_ino != crashed["parts"][key].st_ino
        assert after["parts"][key].st_mtime_ns > crashed["parts"][key].st_mtime_ns


def test_a_malformed_crash_point_is_refused():
    from helpers.crash_driver import crash_at

    for step, n in (("after-done", 0), ("mid-publish", 1)):
        with pytest.raises(ValueError, match="STEP must be one of"):
            crash_at(step, n)


# ---- writes that die half way ----------------------------------------------------------------


class WriterDied(Exception):
    """The injected failure: the Parquet writer stopped half way through a file."""


@pytest.fixture
def writer_dies_half_way(monkeypatch):
    """pq.write_table writes the first half of the file's bytes to its sink, then raises; `.clear()` ends it."""
    real = pq.write_table

    def write_table(table, where, **kwargs):
        whole = io.BytesIO()
        real(table, whole, **kwargs)
        data = whole.getvalue()
        where.write(data[: len(data) // 2])
        raise WriterDied(f"the writer died after {len(data) // 2} of {len(data)} bytes")

    monkeypatch.setattr(pq, "write_table", write_table)
    return types.SimpleNamespace(clear=lambda: monkeypatch.setattr(pq, "write_table", real))


@pytest.fixture(params=["local", "s3"])
def output_path(request, tmp_path):
    """(output path, [storage] TOML) of an empty output location, on local disk or on S3 (moto)."""
    if request.param == "local":
        return str(tmp_path / "out"), ""
    endpoint, _, fs = request.getfixturevalue("s3")
    fs.mkdir("results")
    return "s3://results/run", f'[storage.s3]\nendpoint_url = "{endpoint}"\n'


def visible(store) -> list[str]:
    """Every object under the output prefix except scratch (which readers and reruns skip or delete)."""
    store.fs.invalidate_cache()
    try:
        found = store.fs.find(store.root)
    except FileNotFoundError:
        return []
    return sorted(str(p)[len(store.root) + 1:] for p in found if f"/{TMP_DIR}/" not in str(p))


def _naive_publish(store, key, table):
    """What the commit protocol must never do: stream the Parquet writer into the final name."""
    store.probe()  # creates a local output directory, as validation does
    with store.fs.open(store.part_path(key), "wb") as handle:
        pq.write_table(table, handle)


def test_a_part_file_that_dies_half_way_leaves_nothing_and_a_rerun_repairs(output_path, writer_dies_half_way):
    path, storage = output_path
    v = bench(path, [("s3://corpus/a.parquet", 6)], rows_per_file=6, storage=storage)
    v.store.probe()  # as validation does: a local output directory now exists
    unit = v.units[0]
    with pytest.raises(Exception, match="the writer died"):  # as it is, or wrapped by the store
        committer(v, [unit]).add(finished_rows(v, unit))
    assert visible(v.store) == []  # no part file at its final name, no marker
    assert v.store.done() == {} and v.store.parts() == []

    writer_dies_half_way.clear()  # the rerun: cleans up as run_job does, then commits
    v.store.clean_leftovers({unit.key})
    committer(v, [unit]).add(finished_rows(v, unit))
    assert visible(v.store) == [f"_done/{unit.key}.json", f"part-{unit.key}.parquet"]
    assert part_ids(v.store) == {unit.key: unit_ids(unit)}
    assert v.store.done()[unit.key]["rows"] == 6


def test_the_check_catches_a_naive_streaming_write(output_path, writer_dies_half_way):
    """The same failure through fs.open(final, "wb") leaves half a file visible: the trap (s3fs 154)."""
    path, storage = output_path
    v = bench(path, [("s3://corpus/a.parquet", 6)], rows_per_file=6, storage=storage)
    unit = v.units[0]
    table = finished_rows(v, unit)
    with pytest.raises(WriterDied):
        _naive_publish(v.store, unit.key, table)
    assert visible(v.store) == [f"part-{unit.key}.parquet"]  # what the check above rejects
    with v.store.fs.open(v.store.part_path(unit.key), "rb") as handle:
        half = handle.read()
        assert 0 < len(half)
    with pytest.raises(pa.ArrowException):
        pq.read_table(io.BytesIO(half))  # a reader of the output directory would fail on it


_DISK_FULL_SCRIPT = """
import errno, io, resource, sys
sys.path.insert(0, "tests")
import pyarrow.parquet as pq
from helpers.committing import bench, finished_rows
from operators import columns as C
from helpers.committing import committer

v = bench(sys.argv[1], [("file:///in/a.parquet", 200)], rows_per_file=200)
unit = v.units[0]
table = finished_rows(v, unit)
whole = io.BytesIO()  # about the part file the commit writes (without the internal columns)
pq.write_table(table.drop_columns([C.UNIT, C.ROW]), whole, compression=v.spec.output.compression)
limit = len(whole.getvalue()) // 2
# Files of this process may not grow past half the part file: the write fails half way (EFBIG),
# as a full disk would. Python ignores SIGXFSZ, so the failing write raises OSError.
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    committer(v, [unit]).add(table)
except Exception as exc:  # the store wraps the OSError (in a StorageError, itself an OSError without errno)
    while exc is not None and getattr(exc, "errno", None) is None:
        exc = exc.__cause__ or exc.__context__
    print("failed:", errno.errorcode.get(getattr(exc, "errno", None)), limit)
    sys.exit(0)
print("the write did not fail")
sys.exit(1)
"""


def test_a_local_disk_that_fails_mid_file_leaves_nothing_and_a_rerun_repairs(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _DISK_FULL_SCRIPT, str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "failed: EFBIG" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    limit = int(proc.stdout.split()[-1])
    v = bench(str(out), [("file:///in/a.parquet", 200)], rows_per_file=200)
    unit = v.units[0]
    assert visible(v.store) == [] and v.store.done() == {}
    scratch = list((out / TMP_DIR).iterdir())
    assert all(p.stat().st_size <= limit for p in scratch)  # a half file may stay in scratch, never elsewhere

    v.store.clean_leftovers({unit.key})
    committer(v, [unit]).add(finished_rows(v, unit))
    assert not list((out / TMP_DIR).iterdir())
    assert part_ids(v.store) == {unit.key: unit_ids(unit)} and unit.key in v.store.done()


class UploadFailed(Exception):
    """The injected failure: an S3 request to the part file's key did not go through."""


def test_a_failed_s3_upload_leaves_nothing_and_a_rerun_repairs(s3):
    endpoint, _, fs = s3
    fs.mkdir("results")
    v = bench("s3://results/run", [("s3://corpus/a.parquet", 6)], rows_per_file=6,
              storage=f'[storage.s3]\nendpoint_url = "{endpoint}"\n')
    unit = v.units[0]
    failed = []

    def fail_part_uploads(request, **_):
        if f"part-{unit.key}" in request.url:
            failed.append(request.url)
            raise UploadFailed(request.url)

    events = v.store.fs.s3.meta.events
    # Every request that could carry the part file's bytes; markers and listings go through.
    names = [f"before-send.s3.{op}" for op in ("PutObject", "CreateMultipartUpload", "UploadPart")]
    for name in names:
        events.register(name, fail_part_uploads)
    try:
        with pytest.raises(Exception, match="UploadFailed|results/run"):
            committer(v, [unit]).add(finished_rows(v, unit))
    finally:
        for name in names:
            events.unregister(name, fail_part_uploads)
    assert failed and visible(v.store) == []  # the upload was tried; nothing is there, no marker

    v.store.clean_leftovers({unit.key})
    committer(v, [unit]).add(finished_rows(v, unit))
    assert part_ids(v.store) == {unit.key: unit_ids(unit)} and unit.key in v.store.done()
