"""Whole jobs on S3 while the store misbehaves: throttling (503 SlowDown), lost requests (read
timeouts), and write permission refused before or after validation.

The faults come from tests/helpers/s3_faults.py, a proxy between every S3 client of the job and the
moto server: the driver's (validation, commit) and the Ray workers' (input reads, checkpoint
loading), since the job's [storage.s3] endpoint_url points at the proxy. Issue #5, point 4.
"""

from __future__ import annotations

import gc
import time

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from helpers.pipeline_data import job_toml, mixed_rows, write_inputs
from helpers.s3_faults import DENIED, READ, SLOWDOWN, STALL, WRITE, S3FaultProxy
from operators import columns as C
from pipeline import build
from pipeline import run as run_module
from pipeline.paths import StorageError
from pipeline.run import run_job
from pipeline.spec import S3_CONFIG_DEFAULTS, JobError, load_job

OUTPUT = "results/run"
SUMMARIZE_ONLY = """
[[task]]
kind = "summarize"
max_new_tokens = 4
"""
READ_TIMEOUT = 2  # seconds; the proxy's stalls last longer, so each one is a client read timeout
DEFAULT_ATTEMPTS = S3_CONFIG_DEFAULTS["retries"]["total_max_attempts"]


@pytest.fixture
def store(s3, tiny_checkpoint):
    """A fresh moto S3 holding the checkpoint and the input; the rows written; the moto filesystem
    (which reaches moto directly, never through the proxy)."""
    _, _, fs = s3
    for bucket in ("corpus", "models", "results"):
        fs.mkdir(bucket)
    fs.put(str(tiny_checkpoint) + "/", "models/tiny/", recursive=True)
    rows, _ = mixed_rows(good=12)
    write_inputs(rows, "corpus/docs", fs=fs, files=2)
    return rows, fs


@pytest.fixture
def proxy(s3_endpoint, store):
    with S3FaultProxy(s3_endpoint, stall_seconds=READ_TIMEOUT + 2, seed=5) as p:
        yield p


def job_through(proxy: S3FaultProxy) -> str:
    """The job on S3 through the proxy; it sets only a short read timeout, so the retries it gets
    are the defaults of every job (spec.S3_CONFIG_DEFAULTS)."""
    storage = (f'[storage.s3]\nendpoint_url = "{proxy.endpoint}"\n\n[storage.s3.config_kwargs]\n'
               f"read_timeout = {READ_TIMEOUT}\n")
    return job_toml("s3://models/tiny/", "s3://corpus/docs/*.parquet", f"s3://{OUTPUT}/", tasks=SUMMARIZE_ONLY,
                    rows_per_file=4, storage=storage)


@pytest.fixture
def at_plan_start(monkeypatch):
    """Registers actions to run when the job builds its Ray plan: after validation, the probe and the
    manifest, before any Ray work; returns the registry (a list to append callables to)."""
    actions = []
    real = build.build_dataset

    def build_dataset(plan, **kwargs):
        for action in actions:
            action()
        return real(plan, **kwargs)

    monkeypatch.setattr(build, "build_dataset", build_dataset)
    return actions


def objects(fs, prefix: str = OUTPUT) -> list[str]:
    fs.invalidate_cache()
    return [p[len(prefix) + 1:] for p in fs.find(prefix)]


def wait_for_ray_to_settle(timeout: float = 60.0) -> None:
    """A failed job must not leave its actor pool holding the session's Ray (other tests need it)."""
    import ray

    gc.collect()  # drops the failed run's plan iterator, which shuts its execution down
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline, f"Ray still busy: {ray.available_resources()}"
        time.sleep(0.5)


# ---- the retry policy every S3 filesystem of a job gets ----------------------------------------


def test_s3_options_get_bounded_retries_unless_the_job_sets_its_own():
    def options(storage: str, path: str = "s3://bucket/x") -> dict:
        return load_job(job_toml("/ckpt", "/in/*.parquet", "/out", storage=storage)).storage_options(path)

    plain = options('[storage.s3]\nendpoint_url = "http://127.0.0.1:9000"')
    assert plain == {"endpoint_url": "http://127.0.0.1:9000", "config_kwargs": S3_CONFIG_DEFAULTS}
    assert options("", "s3a://bucket/x") == {"config_kwargs": S3_CONFIG_DEFAULTS}  # no [storage] at all
    assert S3_CONFIG_DEFAULTS["retries"]["mode"] == "standard" and 1 < DEFAULT_ATTEMPTS <= 10
    # The job's own values win key by key; "retries" is one setting (botocore would let our
    # total_max_attempts override the job's max_attempts).
    own = options('[storage.s3.config_kwargs]\nread_timeout = 5\nretries = { max_attempts = 2 }')
    assert own["config_kwargs"] == {"read_timeout": 5, "retries": {"max_attempts": 2},
                                    "connect_timeout": S3_CONFIG_DEFAULTS["connect_timeout"]}
    assert options('[storage.gcs]\nproject = "p"', "gs://bucket/x") == {"project": "p"}  # other stores: as written
    assert options("", "/local/x") == {}


# ---- transient faults: the job completes -------------------------------------------------------


def test_job_completes_through_throttling_and_lost_requests(ray_cluster, store, proxy, at_plan_start):
    rows, fs = store
    # Faults from validation on, at rates that keep the run short: each fault is real waiting (botocore's
    # backoff doubles per attempt, a stall costs the read timeout), and at 0.25 the run took 30-45 s.
    proxy.set_faults(slowdown_rate=0.1, stall_rate=0.1, max_stalls=1)

    def run_phase():  # requests from here on: Ray workers' reads, driver's commit
        proxy.phase("run")
        proxy.set_faults(slowdown_rate=0.15, stall_rate=0.1, max_stalls=1)

    at_plan_start.append(run_phase)

    report = run_job(load_job(job_through(proxy)))

    assert report["complete"] and report["rows_out"] == len(rows)
    table = pads.dataset(OUTPUT, format="parquet", filesystem=fs).to_table()
    ids = table.column(C.ID).to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows)  # exactly one row per input row
    names = objects(fs)
    parts = [n for n in names if n.startswith("part-")]
    markers = [n for n in names if n.startswith("_done/")]
    assert len(parts) == len(markers) == report["units_total"] == report["units_computed"]
    assert {n[len("part-"):-len(".parquet")] for n in parts} == {n[len("_done/"):-len(".json")] for n in markers}
    assert sum(pq.ParquetFile(fs.open(f"{OUTPUT}/{n}")).metadata.num_rows for n in parts) == len(rows)

    # The faults really happened, on the workers' reads and on the driver's commit writes ...
    assert proxy.count(SLOWDOWN, READ, phase="run") >= 1, proxy.summary()
    assert proxy.count(SLOWDOWN, WRITE, phase="run", path_prefix=OUTPUT) >= 1, proxy.summary()
    assert proxy.count(STALL) >= 1, proxy.summary()
    # ... and every client retried under the job's bounded policy (the default attempt limit; the
    # job only set read_timeout): botocore tells each retried request's limit in a header.
    for direction in (READ, WRITE):
        retried = [e for e in proxy.events if e.phase == "run" and e.direction == direction and (e.attempt or 1) > 1]
        assert retried, direction
        assert {e.max_attempts for e in retried} == {DEFAULT_ATTEMPTS}, direction
    assert max(e.attempt or 1 for e in proxy.events) <= DEFAULT_ATTEMPTS


# ---- faults that do not pass: the job fails, in bounded time, and commits nothing wrong --------


@pytest.mark.slow  # the default retry policy's backoff takes a minute or so to give up
def test_a_store_that_always_throttles_fails_the_job_in_bounded_time(ray_cluster, store, proxy, at_plan_start):
    _, fs = store
    at_plan_start.append(lambda: (proxy.phase("run"), proxy.set_faults(slowdown_rate=1.0)))

    started = time.monotonic()
    with pytest.raises(Exception, match=r"reduce your request rate|SlowDown|Service Unavailable") as failure:
        run_job(load_job(job_through(proxy)))
    elapsed = time.monotonic() - started
    assert not isinstance(failure.value, JobError)  # it got past validation: the faults hit the run
    assert elapsed < 300, elapsed  # a few minutes at most, not forever
    del failure
    wait_for_ray_to_settle()
    # It gave up because the default policy's attempts ran out, and nothing retries after the failure.
    retried = [e for e in proxy.events if e.phase == "run" and (e.attempt or 1) > 1]
    assert {e.max_attempts for e in retried} == {DEFAULT_ATTEMPTS}
    assert max(e.attempt for e in retried) == DEFAULT_ATTEMPTS
    settled = len(proxy.events)
    time.sleep(3)
    assert len(proxy.events) == settled
    assert not [n for n in objects(fs) if n.startswith(("part-", "_done/"))]  # nothing committed


def test_output_without_write_permission_fails_validation(store, proxy, monkeypatch):
    _, fs = store

    def refuse(address=None):
        raise AssertionError("validation should have failed before Ray was touched")

    monkeypatch.setattr(run_module, "_connect", refuse)
    proxy.deny_writes(OUTPUT)
    started = time.monotonic()
    with pytest.raises(JobError, match=rf"output.path 's3://{OUTPUT}' is not writable \(PermissionError: Access "
                                       rf"Denied\); .*fix its permissions"):
        run_job(load_job(job_through(proxy)))
    assert time.monotonic() - started < 60
    assert proxy.count(DENIED) == 1  # the probe's write was refused once, and not retried
    assert objects(fs) == []


def test_write_permission_lost_after_validation_fails_the_commit_fast(ray_cluster, store, proxy, at_plan_start):
    _, fs = store
    armed = []
    at_plan_start.append(lambda: (proxy.deny_writes(OUTPUT), armed.append(time.monotonic())))

    with pytest.raises(StorageError, match=rf"cannot write 'part-[0-9a-f]+\.parquet' under output.path "
                                           rf"'s3://{OUTPUT}' \(PermissionError: Access Denied\); .*s3:PutObject"):
        run_job(load_job(job_through(proxy)))
    failed = time.monotonic()
    assert armed and failed - armed[0] < 60
    wait_for_ray_to_settle()
    assert proxy.count(DENIED) == 1  # the first commit write was refused once, not retried for minutes
    names = objects(fs)
    assert "_job.json" in names  # written before the permission went away
    assert not [n for n in names if n.startswith(("part-", "_done/"))]  # no done-marker without its part file
