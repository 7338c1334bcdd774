"""Model actors under faults, through the real pipeline on a local Ray: actors that die on a share of
calls and in the middle of a batch, injected device out-of-memory, calls that hang, a process that
freezes, and a two-node cluster that loses one node's workers mid-job.

Faults come from the test-only hooks of tests/helpers/actor_faults.py (files named by T5G2_FAULT_* variables,
set for the session's Ray in tests/conftest.py); every fault that fires leaves a line in
"<file>.fired", so each test also proves its faults really happened. Outputs are compared with a
clean run of the same input: generation is batch-invariant, so a run that survived faults must give
exactly the clean run's rows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import ray.data

from helpers import actor_faults as fault_hooks
from helpers.pipeline_data import job_toml, mixed_rows, write_inputs
from operators import columns as C
from pipeline import build
from pipeline import run as run_module
from pipeline.commit import DONE_DIR, PART_PREFIX
from pipeline.spec import load_job

REPO = Path(__file__).resolve().parents[2]
TASKS = ("caption", "summary", "german")
POISON_ID = "good-005"


# ---- helpers -----------------------------------------------------------------------------------


def run_job(spec, **kwargs):
    """A run whose model actors are FaultyInferActor (tests/helpers/actor_faults.py)."""
    return run_module.run_job(spec, hooks=fault_hooks.FAULTY, **kwargs)


@pytest.fixture
def faults(ray_cluster):
    """The hook files by variable (write one to arm its fault); all disarmed and their logs removed after."""
    paths = {env: Path(os.environ[env]) for env in fault_hooks.FAULT_ENVS}

    def disarm():
        for path in paths.values():
            path.unlink(missing_ok=True)
            Path(str(path) + fault_hooks.FAULT_LOG_SUFFIX).unlink(missing_ok=True)

    disarm()
    yield paths
    disarm()


def fired(paths: dict, env: str) -> list[tuple[str, dict]]:
    """The faults of hook `env` that fired: (fault, facts) per line "<fault> batch=... pid=N" of its log."""
    log = Path(str(paths[env]) + fault_hooks.FAULT_LOG_SUFFIX)
    lines = log.read_text().splitlines() if log.exists() else []
    return [(words[0], dict(w.split("=", 1) for w in words[1:])) for words in map(str.split, lines)]


def worker_log_lines(containing: str) -> list[str]:
    """Lines of the session Ray's worker stderr logs that contain `containing` (the session runs with
    log_to_driver=False, so an actor's messages are only there; the logs directory has no public API)."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return [line for path in logs.glob("worker-*.err") for line in path.read_text(errors="replace").splitlines()
            if containing in line]


def job(checkpoint, inputs: str, out: Path, *overrides: str):
    return load_job(job_toml(str(checkpoint), inputs, str(out)), list(overrides))


def committed_rows(out: Path) -> dict[str, dict]:
    """Every committed part file read on its own (each must be readable), as id -> row; asserts that
    every part file has its done-marker and that no id appears twice."""
    parts = sorted(out.glob(f"{PART_PREFIX}*.parquet"))
    markers = {p.stem for p in (out / DONE_DIR).glob("*.json")}
    assert parts and {p.stem[len(PART_PREFIX):] for p in parts} == markers
    rows: dict[str, dict] = {}
    for part in parts:
        table = pq.read_table(part)
        marker = out / DONE_DIR / f"{part.stem[len(PART_PREFIX):]}.json"
        assert table.num_rows == json.loads(marker.read_text())["rows"]
        for row in table.to_pylist():
            assert row[C.ID] not in rows, f"duplicate id {row[C.ID]}"
            rows[row[C.ID]] = row
    return rows


def results(rows: dict[str, dict]) -> dict[str, tuple]:
    """What the model decided per row: each task's text, finish reason and error kind."""
    return {i: tuple((r[t], r[f"{t}_finish_reason"], r[f"{t}_error_kind"]) for t in TASKS) for i, r in rows.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rows, _ = mixed_rows()
    directory = tmp_path_factory.mktemp("actor-faults-in")
    write_inputs(rows, str(directory))
    return rows, f"{directory}/*.parquet"


@pytest.fixture(scope="module")
def clean(ray_cluster, tiny_checkpoint, dataset, tmp_path_factory):
    """The clean run's committed rows (no fault armed), the reference for every faulted run."""
    rows, inputs = dataset
    for env in fault_hooks.FAULT_ENVS:
        assert not Path(os.environ[env]).exists(), f"{env} is armed before the clean run"
    out = tmp_path_factory.mktemp("clean") / "out"
    report = run_job(job(tiny_checkpoint, inputs, out))
    assert report["complete"] and report["rows_out"] == len(rows)
    return committed_rows(out)


def assert_same_as_clean(out: Path, clean: dict, rows: list[dict], report: dict, *, except_ids=()) -> dict:
    """Exactly once (one row per input, no duplicates, every part readable) and the clean run's results."""
    got = committed_rows(out)
    assert sorted(got) == sorted(r["id"] for r in rows)
    assert report["complete"] and report["rows_out"] == len(rows)
    same = {i for i in got if i not in except_ids}
    ours, theirs = results(got), results(clean)
    assert {i: ours[i] for i in same} == {i: theirs[i] for i in same}
    return got


# ---- 1. actors that die ------------------------------------------------------------------------


def test_actors_dying_on_a_share_of_calls_and_mid_batch_give_each_row_exactly_once(
        faults, tiny_checkpoint, dataset, clean, tmp_path):
    rows, inputs = dataset
    faults[fault_hooks.ACTOR_EXIT_EVERY_ENV].write_text("3")  # every actor process dies at its 3rd, 6th, ... call
    faults[fault_hooks.ACTOR_EXIT_MID_BATCH_ENV].write_text("armed")  # and one dies inside the decoder, mid-batch
    out = tmp_path / "out"
    report = run_job(job(tiny_checkpoint, inputs, out, "resources.rows_per_call=4"))

    every = fired(faults, fault_hooks.ACTOR_EXIT_EVERY_ENV)
    mid = fired(faults, fault_hooks.ACTOR_EXIT_MID_BATCH_ENV)
    assert len(every) >= 2 and all(f == "exit-every" and int(facts["call"]) % 3 == 0 for f, facts in every), every
    assert len({facts["batch"] for _, facts in every}) == len(every)  # a batch dies once: the retries finish the job
    assert [f for f, _ in mid] == ["exit-mid-batch"] and not faults[fault_hooks.ACTOR_EXIT_MID_BATCH_ENV].exists()
    assert_same_as_clean(out, clean, rows, report)


# ---- 5. device out of memory ---------------------------------------------------------------------


def test_out_of_memory_splits_batches_and_only_the_row_that_fails_alone_gets_the_error(
        faults, tiny_checkpoint, dataset, clean, tmp_path):
    rows, inputs = dataset
    # Any micro-batch of more padded tokens than the longest single prompt runs out of memory, so
    # only requests alone run; and every micro-batch holding a prompt of POISON_ID does, even alone.
    longest = max(r[f"{t}_input_tokens"] or 0 for r in clean.values() for t in TASKS)
    faults[fault_hooks.ACTOR_OOM_ENV].write_text(json.dumps({"max_tokens": longest, "poison_ids": [POISON_ID]}))
    out = tmp_path / "out"
    report = run_job(job(tiny_checkpoint, inputs, out))

    ooms = fired(faults, fault_hooks.ACTOR_OOM_ENV)
    by_size = [facts for f, facts in ooms if f == "oom-size"]
    alone = [facts for f, facts in ooms if f == "oom-poison" and facts["rows"] == "1"]
    assert by_size and all(int(facts["rows"]) > 1 for facts in by_size), ooms  # multi-request batches were split
    assert len(alone) == len(TASKS), ooms  # the poison row's requests, one per task, failed alone
    got = assert_same_as_clean(out, clean, rows, report, except_ids={POISON_ID})
    poison = got[POISON_ID]
    assert poison[C.ERROR_KIND] == "out_of_memory"
    for t in TASKS:
        assert poison[f"{t}_error_kind"] == "out_of_memory" and poison[t] is None
        assert "out of device memory" in poison[f"{t}_error_message"]
    assert report["errors_by_kind"]["out_of_memory"] == 1
    assert sum(1 for r in got.values() if r[C.ERROR_KIND] == "out_of_memory") == 1


# ---- 6. calls that hang ------------------------------------------------------------------------


def test_a_hung_call_is_stopped_after_call_timeout_and_retried(faults, tiny_checkpoint, dataset, clean, tmp_path):
    rows, inputs = dataset
    faults[fault_hooks.ACTOR_HANG_ENV].write_text("once")  # the first call sleeps for ever
    out = tmp_path / "out"
    started = time.monotonic()
    report = run_job(job(tiny_checkpoint, inputs, out, "resources.rows_per_call=4", "resources.call_timeout_s=6"))
    assert time.monotonic() - started < 240  # bounded; without the guard it never returns

    (hang,) = fired(faults, fault_hooks.ACTOR_HANG_ENV)
    assert hang[0] == "hang-once"
    # The guard said why it stopped the process, naming the setting.
    said = worker_log_lines(f"stopping this actor process (pid {hang[1]['pid']})")
    assert said and "resources.call_timeout_s = 6 s" in said[0] and said[0].startswith(build.HANG_GUARD_MESSAGE)
    assert_same_as_clean(out, clean, rows, report)


@pytest.mark.slow
def test_a_call_that_hangs_every_time_fails_the_job_with_the_setting_named(faults, tiny_checkpoint, dataset,
                                                                          tmp_path):
    _, inputs = dataset
    faults[fault_hooks.ACTOR_HANG_ENV].write_text("always")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"tried {build.CALL_RETRIES + 1} times at most.*resources.call_timeout_s "
                                           rf"= 4 s and the hang guard stopped it"):
        run_job(job(tiny_checkpoint, inputs, tmp_path / "out", "resources.rows_per_call=4",
                    "resources.call_timeout_s=4"))
    assert time.monotonic() - started < 300
    hangs = fired(faults, fault_hooks.ACTOR_HANG_ENV)
    assert len(hangs) >= build.CALL_RETRIES + 1 and {f for f, _ in hangs} == {"hang-always"}
    assert len({facts["pid"] for _, facts in hangs}) == len(hangs)  # each attempt in a new process: restarted


@pytest.mark.slow
def test_a_frozen_actor_process_fails_the_job_by_the_no_progress_bound(faults, tiny_checkpoint, dataset, tmp_path,
                                                                      monkeypatch):
    _, inputs = dataset
    # Ray Data's own bound is the floor of ours (30 min unless changed): lower it so that 3 x
    # call_timeout_s decides, as it does in production for call timeouts above 10 minutes.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "execution_no_progress_timeout_s", 1)
    faults[fault_hooks.ACTOR_HANG_ENV].write_text("freeze")  # SIGSTOP: the hang guard's thread stops too
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"nothing moved through the pipeline .*3 x resources.call_timeout_s "
                                               r"= 30 s"):
            run_job(job(tiny_checkpoint, inputs, tmp_path / "out", "resources.call_timeout_s=10"))
        assert time.monotonic() - started < 300
        (freeze,) = fired(faults, fault_hooks.ACTOR_HANG_ENV)
        assert freeze[0] == "hang-freeze"
    finally:
        # Ray Data releases a failed run's actors gracefully, which a stopped process never
        # answers: it would hold its CPU until this session's Ray ends. Kill it for the next tests.
        for _, facts in fired(faults, fault_hooks.ACTOR_HANG_ENV):
            try:
                os.kill(int(facts["pid"]), signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- 10. two nodes --------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_node_cluster_losing_one_nodes_workers_mid_job_gives_each_row_exactly_once(tiny_checkpoint, tmp_path):
    """tests/helpers/faults.py runs the job on its own two-node Ray (not the session's) and kills the
    second node's worker processes once the first unit is committed."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "helpers.faults", "two-nodes", str(tiny_checkpoint), str(tmp_path)],
                          cwd=REPO / "tests", capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["nodes"] == 2 and len(facts["actor_nodes"]) == 2  # the model actors ran on both nodes
    assert facts["second_node"] in facts["actor_nodes"]  # so the kill hit a model actor
    assert facts["killed_workers"] >= 1 and facts["units_done_at_kill"] < facts["units_total"]  # mid-job
    assert facts["actor_restarts"] >= 1 and facts["nodes_alive_after"] == 2  # workers died, not the node
    rows = committed_rows(out)
    assert sorted(rows) == sorted(facts["input_ids"])
    assert facts["report"]["complete"] and facts["report"]["rows_out"] == len(facts["input_ids"])
