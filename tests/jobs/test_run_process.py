"""`t5g2 run` as a process, as a scheduler runs it: which Ray it uses, how it stops on a signal, its exit
codes (the README's table), and the report's path as the last line it prints.

Each test starts the command in a child process. The Ray temp directory is a fresh short one per
test (RAY_TMPDIR), so a cluster address "recorded" there is the test's own and nothing of the
machine's real /tmp/ray is read or left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from helpers.pipeline_data import job_toml, mixed_rows, write_inputs
from helpers.report_schema import documented_keys, report_keys
from jobs import cli
from operators import columns as C
from pipeline.run import run_job
from pipeline.spec import load_job

REPO = Path(__file__).resolve().parents[2]
TASK = """
[[task]]
kind = "summarize"
max_new_tokens = 3
"""


def dead_address() -> str:
    """host:port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def ray_tmp():
    path = tempfile.mkdtemp(prefix="t5g2r", dir="/tmp")  # short: Ray's socket paths live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def child_env(ray_tmp: str | None) -> dict:
    """The test's environment without RAY_ADDRESS; with `ray_tmp`, Ray's temp directory moved there."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    if ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp
    return env


@pytest.fixture
def job_file(tiny_checkpoint, tmp_path):
    rows, _ = mixed_rows(good=4)
    write_inputs(rows[:4], str(tmp_path / "in"), files=1)
    path = tmp_path / "job.toml"
    path.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(tmp_path / "out"), tasks=TASK))
    return path


def test_without_an_address_a_fresh_local_ray_is_started(job_file, ray_tmp, tmp_path):
    """A cluster address recorded on the machine (Ray's default for ray.init()) is not joined."""
    recorded = Path(ray_tmp) / "ray" / "ray_current_cluster"
    recorded.parent.mkdir(parents=True)
    recorded.write_text(dead_address())  # a `ray start` that crashed long ago
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(job_file)], cwd=REPO,
                          env=child_env(ray_tmp), capture_output=True, text=True, timeout=240)
    assert proc.returncode == cli.EXIT_OK, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rows in 4, written now 4" in proc.stdout
    assert proc.stdout.splitlines()[-1] == str(tmp_path / "out" / "_report.json")  # the report's path, last


def test_an_address_that_does_not_answer_fails_fast_naming_it(job_file, ray_tmp, tmp_path):
    address = dead_address()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(job_file), "--address", address],
                          cwd=REPO, env=child_env(ray_tmp), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60
    # A cluster that does not answer is infrastructure (a scheduler may retry), not a wrong job.
    assert proc.returncode == cli.EXIT_INFRASTRUCTURE, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"no Ray cluster answers at {address}" in proc.stderr and "--address" in proc.stderr
    assert not list((tmp_path / "out").glob("part-*"))


# SIGTERM (what schedulers send, and the signal Ray's own handler also takes) in every run; SIGINT, through
# the same handler, nightly (make test-slow), to keep `make test` under 15 minutes.
@pytest.mark.parametrize("stop", [pytest.param(signal.SIGINT, marks=pytest.mark.slow, id="SIGINT"),
                                  pytest.param(signal.SIGTERM, id="SIGTERM")])
def test_a_signal_after_the_first_commit_stops_cleanly_and_a_rerun_completes(ray_cluster, tiny_checkpoint, tmp_path,
                                                                             stop):
    rows, _ = mixed_rows(good=16)
    write_inputs(rows, str(tmp_path / "in"), files=2)
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out), tasks=TASK,
                            rows_per_file=1))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(job), "--address", ray_cluster,
                             "--set", "resources.rows_per_call=1"],
                            cwd=REPO, env=child_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 180
        while not list((out / "_done").glob("*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "no unit was committed"
            time.sleep(0.05)
        proc.send_signal(stop)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # 128 + the signal's number, as a shell reports a command the signal stopped
    assert proc.returncode == 128 + stop, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"stopped by {stop.name}" in stderr and "run the same command again to resume" in stderr
    committed = len(list((out / "_done").glob("*.json")))
    assert 1 <= committed < len(rows)
    assert f"{committed} of {len(rows)} units committed" in stderr
    report = json.loads((out / "_report.json").read_text())
    assert report["interrupted"] == stop.name and not report["complete"]
    assert stdout.splitlines()[-1] == str(out / "_report.json")
    status = subprocess.run([sys.executable, "-m", "jobs.cli", "status", str(out)], cwd=REPO, env=child_env(None),
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == cli.EXIT_IN_PROGRESS and f"the latest run stopped by {stop.name}" in status.stdout

    again = run_job(load_job(str(job)))
    assert again["units_reused"] == committed and again["complete"]
    table = pads.dataset(str(out), format="parquet").to_table()
    assert sorted(table.column(C.ID).to_pylist()) == sorted(r["id"] for r in rows)


def t5g2(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=child_env(None),
                          capture_output=True, text=True, timeout=timeout)


def test_exit_codes_and_the_report_path_as_a_scheduler_sees_them(ray_cluster, tiny_checkpoint, tmp_path):
    rows, _ = mixed_rows(good=4)
    write_inputs(rows[:4] + [r for r in rows if r["id"] in ("text-empty", "text-utf8")], str(tmp_path / "in"),
                 files=1)
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out), tasks=TASK))

    # Invalid: 2, the fix on stderr, nothing computed, no report; a dry run says the same, with the same code.
    bad = ["--set", "input.text_column=body"]
    invalid = t5g2("run", str(job), *bad, "--address", ray_cluster)
    assert invalid.returncode == cli.EXIT_INVALID, invalid.stderr[-3000:]
    assert "t5g2 run: the job cannot run: input.text_column 'body' is not a column" in invalid.stderr
    assert not invalid.stdout.strip().endswith("_report.json") and not (out / "_report.json").exists()
    dry_invalid = t5g2("run", str(job), "--dry-run", *bad)
    assert dry_invalid.returncode == cli.EXIT_INVALID and dry_invalid.stderr == invalid.stderr

    # Valid dry run: 0, the estimate printed, nothing of a run written.
    dry = t5g2("run", str(job), "--dry-run")
    assert dry.returncode == cli.EXIT_OK, dry.stderr[-3000:]
    assert "the job is valid" in dry.stdout and "estimate  for 1 actor(s)" in dry.stdout
    assert not (out / "_job.json").exists()

    # Complete with error rows: 3, and the report's path is the last line.
    run = t5g2("run", str(job), "--address", ray_cluster)
    assert run.returncode == cli.EXIT_ERROR_ROWS, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == str(out / "_report.json")
    report = json.loads((out / "_report.json").read_text())
    assert report["complete"] and report["all_runs"]["errors_by_kind"] == {"text_empty": 1, "text_invalid_utf8": 1}
    assert report_keys(report) == documented_keys()  # the README's schema is the report's
    # Run again: nothing computed, the same output, the same code; status agrees.
    assert t5g2("run", str(job), "--address", ray_cluster).returncode == cli.EXIT_ERROR_ROWS
    assert t5g2("status", str(out)).returncode == cli.EXIT_ERROR_ROWS

    # The store unreachable while the job is validated: infrastructure (4), not an invalid job.
    s3_job = tmp_path / "s3-job.toml"
    storage = (f'[storage.s3]\nendpoint_url = "http://{dead_address()}"\n'
               f'config_kwargs = {{retries = {{total_max_attempts = 1, mode = "standard"}}, connect_timeout = 1}}\n')
    s3_job.write_text(job_toml(str(tiny_checkpoint), "s3://corpus/docs/*.parquet", str(tmp_path / "out-s3"), tasks=TASK,
                               storage=storage))
    down = t5g2("run", str(s3_job), "--address", ray_cluster)
    assert down.returncode == cli.EXIT_INFRASTRUCTURE, down.stdout[-2000:] + down.stderr[-3000:]
    assert "t5g2 run: the job stopped: " in down.stderr and "Traceback" not in down.stderr
    assert t5g2("run", str(s3_job), "--dry-run").returncode == cli.EXIT_INFRASTRUCTURE
