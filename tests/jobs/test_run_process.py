"""`t5g2 run` as a process, as a scheduler runs it: which Ray it uses, and how it stops on a signal.

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
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rows in 4, written now 4" in proc.stdout


def test_an_address_that_does_not_answer_fails_fast_naming_it(job_file, ray_tmp, tmp_path):
    address = dead_address()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(job_file), "--address", address],
                          cwd=REPO, env=child_env(ray_tmp), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"no Ray cluster answers at {address}" in proc.stderr and "--address" in proc.stderr
    assert not list((tmp_path / "out").glob("part-*"))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
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

    again = run_job(load_job(str(job)))
    assert again["units_reused"] == committed and again["complete"]
    table = pads.dataset(str(out), format="parquet").to_table()
    assert sorted(table.column(C.ID).to_pylist()) == sorted(r["id"] for r in rows)
