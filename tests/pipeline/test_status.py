"""`t5g2 status OUTPUT_PATH`: complete, in progress, stale or empty, from what the commit protocol wrote,
on local paths and on the real S3 server (moto), without Ray; and its exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers.crash_driver import CRASH_EXIT_CODE
from helpers.pipeline_data import job_toml, mixed_rows, rows_table, write_inputs
from jobs import cli
from pipeline.commit import DONE_DIR, MANIFEST, REPORT
from pipeline.run import run_job
from pipeline.spec import load_job
from pipeline.status import output_status

REPO = Path(__file__).resolve().parents[2]
SUMMARIZE = """
[[task]]
kind = "summarize"
max_new_tokens = 2
"""


def test_states_of_a_local_output_through_its_life(ray_cluster, tiny_checkpoint, tmp_path, capsys):
    rows, _ = mixed_rows(good=12)
    good = rows[:12]
    write_inputs(good, str(tmp_path / "in"), files=2)  # 2 files x 6 rows -> 4 units of 3 rows
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out), tasks=SUMMARIZE,
                            rows_per_file=3))

    assert output_status(str(out))["state"] == "empty"  # no such directory yet
    assert cli.main(["status", str(out)]) == cli.EXIT_EMPTY
    assert "empty" in capsys.readouterr().out

    # A driver killed after its second commit: markers but no report.
    proc = subprocess.run([sys.executable, "-m", "helpers.crash_driver", "after-done:2", str(job), ray_cluster],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == CRASH_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-3000:]
    status = output_status(str(out))
    assert status["state"] == "in_progress" and status["units_committed"] == 2
    assert "no run has finished here yet" in status["reasons"][0]
    assert cli.main(["status", str(out)]) == cli.EXIT_IN_PROGRESS

    report = run_job(load_job(str(job)))
    assert report["complete"]
    status = output_status(str(out))
    assert status["state"] == "complete", status["reasons"]
    assert (status["units_committed"], status["units_total"], status["rows"], status["error_rows"]) == (4, 4, 12, 0)
    assert status["inputs"] == {"paths": [f"{tmp_path}/in/*.parquet"], "files_then": 2, "files_now": 2,
                                "unchanged": True}
    assert cli.main(["status", str(out)]) == cli.EXIT_OK
    assert f"{out}: complete" in capsys.readouterr().out
    assert cli.main(["status", str(job), "--json"]) == cli.EXIT_OK  # the job file names the same output
    assert json.loads(capsys.readouterr().out)["state"] == "complete"
    # With a job file, the input is the job's as written now: pointed elsewhere, the output is stale for it.
    other = tmp_path / "other.toml"
    other.write_text(job.read_text().replace(f"{tmp_path}/in/*.parquet", f"{tmp_path}/in/part-0.parquet"))
    assert cli.main(["status", str(other)]) == cli.EXIT_STALE
    assert "1 now" in capsys.readouterr().out

    # The input grows: the complete output no longer mirrors it.
    write_inputs(mixed_rows(good=3)[0][:3], str(tmp_path / "more"), files=1)
    (tmp_path / "more" / "part-0.parquet").rename(tmp_path / "in" / "part-7.parquet")
    status = output_status(str(out))
    assert status["state"] == "stale" and status["inputs"]["files_now"] == 3 and not status["inputs"]["unchanged"]
    assert "the input changed since the latest complete run" in status["reasons"][0]
    assert cli.main(["status", str(out)]) == cli.EXIT_STALE
    (tmp_path / "in" / "part-7.parquet").unlink()
    assert output_status(str(out))["state"] == "complete"

    # The output's own records disagree: a part file gone, then the manifest gone.
    part = sorted(out.glob("part-*.parquet"))[0]
    moved = part.rename(tmp_path / part.name)
    status = output_status(str(out))
    assert status["state"] == "stale" and "marked done but their part file is missing" in status["reasons"][0]
    moved.rename(part)
    (out / MANIFEST).rename(tmp_path / MANIFEST)
    status = output_status(str(out))
    assert status["state"] == "stale" and f"the manifest {MANIFEST} is missing" in status["reasons"][0]
    (tmp_path / MANIFEST).rename(out / MANIFEST)

    # A unit committed after the latest report: a later run is running (or was killed).
    marker = sorted((out / DONE_DIR).glob("*.json"))[0]
    later = (out / REPORT).stat().st_mtime + 5
    os.utime(marker, (later, later))
    status = output_status(str(out))
    assert status["state"] == "in_progress" and "committed after the latest report" in status["reasons"][0]


def test_a_complete_output_with_error_rows_and_an_interrupted_one(ray_cluster, tiny_checkpoint, tmp_path, capsys):
    rows, _ = mixed_rows(good=4)
    write_inputs(rows[:4] + [r for r in rows if r["id"] == "text-empty"], str(tmp_path / "in"), files=1)
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out), tasks=SUMMARIZE))
    run_job(load_job(str(job)))
    status = output_status(str(out))
    assert status["state"] == "complete" and status["error_rows"] == 1
    assert status["errors_by_kind"] == {"text_empty": 1}
    assert cli.main(["status", str(out)]) == cli.EXIT_ERROR_ROWS
    assert "error rows 1 (text_empty 1)" in capsys.readouterr().out

    report = json.loads((out / REPORT).read_text())
    (out / REPORT).write_text(json.dumps({**report, "complete": False, "interrupted": "SIGTERM"}))
    status = output_status(str(out))
    assert status["state"] == "in_progress" and "the latest run stopped by SIGTERM" in status["reasons"][0]
    (out / REPORT).write_text("{not json")
    assert output_status(str(out))["state"] == "in_progress"  # a report that cannot be read is no report


def test_status_on_s3(ray_cluster, tiny_checkpoint, s3, capsys):
    endpoint, _, fs = s3
    for bucket in ("corpus", "models", "results"):
        fs.mkdir(bucket)
    fs.put(str(tiny_checkpoint) + "/", "models/tiny/", recursive=True)
    rows, _ = mixed_rows(good=8)
    write_inputs(rows[:8], "corpus/docs", fs=fs, files=2)
    storage = f'[storage.s3]\nendpoint_url = "{endpoint}"\n'
    out = "s3://results/run"
    spec = load_job(job_toml("s3://models/tiny/", "s3://corpus/docs/*.parquet", out, tasks=SUMMARIZE, storage=storage))
    option = ["--option", f"endpoint_url={endpoint}"]

    assert output_status(out, storage=spec.storage)["state"] == "empty"
    assert cli.main(["status", out, *option]) == cli.EXIT_EMPTY
    assert cli.main(["status", "s3://results/nothing-here/", *option]) == cli.EXIT_EMPTY
    capsys.readouterr()

    assert run_job(spec)["complete"]
    assert output_status(out, storage=spec.storage)["state"] == "complete"
    assert cli.main(["status", out, *option]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert f"{out}: complete" in printed
    assert "inputs   2 file(s) now, 2 at the latest complete run: unchanged" in printed

    # A file rewritten in place (a new ETag): stale.
    buffer = io.BytesIO()
    pq.write_table(rows_table(rows[:3]), buffer)
    fs.pipe("corpus/docs/part-1.parquet", buffer.getvalue())
    status = output_status(out, storage=spec.storage)
    assert status["state"] == "stale" and not status["inputs"]["unchanged"]
    assert cli.main(["status", out, *option]) == cli.EXIT_STALE

    fs.rm("results/run/_job.json")
    assert output_status(out, storage=spec.storage)["state"] == "stale"


def test_status_needs_no_ray_and_refuses_bad_arguments(tmp_path, capsys):
    code = ("import sys; from jobs import cli; rc = cli.main(['status', sys.argv[1]]); "
            "print('ray loaded' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == cli.EXIT_EMPTY, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("no ray")
    assert cli.main(["status", str(tmp_path), "--option", "secret=x"]) == cli.EXIT_INVALID
    assert "looks like a credential" in capsys.readouterr().err
    assert cli.main(["status", str(tmp_path), "--option", "nothing"]) == cli.EXIT_INVALID
    with pytest.raises(SystemExit):
        cli.main(["status"])


def test_a_run_that_fails_under_the_job_writes_its_report_and_is_in_progress(ray_cluster, tiny_checkpoint, tmp_path):
    import gc
    import time

    import ray

    from pipeline.run import InfrastructureError, RunHooks

    rows, _ = mixed_rows(good=6)
    write_inputs(rows[:6], str(tmp_path / "in"), files=1)
    out = tmp_path / "out"
    spec = load_job(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out), tasks=SUMMARIZE,
                             rows_per_file=2))

    def fail_after_the_first_commit(step: str, n: int) -> None:
        if (step, n) == ("after-done", 1):
            raise InfrastructureError("model actors kept dying (injected)")

    with pytest.raises(InfrastructureError) as failed:
        run_job(spec, hooks=RunHooks(on_commit_step=fail_after_the_first_commit))
    report = json.loads((out / REPORT).read_text())
    assert failed.value.report == report
    assert not report["complete"] and report["failed"] == "InfrastructureError: model actors kept dying (injected)"
    assert report["units_computed"] == 1 and report["interrupted"] is None
    status = output_status(str(out))
    assert status["state"] == "in_progress"
    assert "the latest run failed: InfrastructureError: model actors kept dying" in status["reasons"][0]

    gc.collect()  # the failed run's plan: its actors must give the session's Ray back
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline, f"Ray still busy: {ray.available_resources()}"
        time.sleep(0.5)
    assert run_job(spec)["complete"] and output_status(str(out))["state"] == "complete"
