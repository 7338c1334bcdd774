"""Content-keyed incremental runs (issue 14, point 1), on the real S3 server with real Parquet and the real pipeline.

A corpus changes the way a nightly job's corpus does (a new file, a file with two rows edited, a file renamed,
a file deleted); the rerun must compute exactly the new and edited rows (the run report counts the rows that
came back through the model), reuse every other row's committed result, leave exactly one output row per
current input row, and write a `_changes.json` that is right. The same holds when the rerun's driver is
killed at a commit step and the job is run again.

Not here: the unit-level exactly-once tests (test_commit_faults.py, test_input_changes.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.crash_driver import CRASH_EXIT_CODE
from helpers.pipeline_data import IMAGE_STRUCT, job_toml
from operators import columns as C
from pipeline.commit import COMMIT_STEPS
from pipeline.dryrun import dry_run
from pipeline.incremental import CHANGES
from pipeline.inputs import derived_ids, read_unit, row_hashes
from pipeline.run import run_job
from pipeline.spec import load_job

REPO = Path(__file__).resolve().parents[2]
TASK = """
[[task]]
kind = "summarize"
max_new_tokens = 3
"""


def texts(prefix: str, n: int) -> list[str]:
    return [f"{prefix} document {i} tells of river {i} and hill {i * 7}." for i in range(n)]


def put(fs, path: str, ids: list | None, body: list[str]) -> None:
    columns = {"text": body, "image": pa.nulls(len(body), IMAGE_STRUCT)}
    if ids is not None:
        columns = {"id": pa.array(ids, pa.string()), **columns}
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, row_group_size=4)
    fs.pipe(path, buffer.getvalue())


def read_output(fs, root: str) -> pa.Table:
    fs.invalidate_cache()
    parts = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    return pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(p))) for p in parts])


def s3_job(tmp_path: Path, checkpoint, endpoint: str, id_column: bool = True) -> Path:
    text = job_toml(str(checkpoint), "s3://corpus/docs/", "s3://results/nightly/", tasks=TASK,
                    rows_per_file=4, storage=f'[storage.s3]\nendpoint_url = "{endpoint}"\n')
    if not id_column:
        text = text.replace('id_column = "id"\n', "")
    job = tmp_path / "job.toml"
    job.write_text(text)
    return job


def the_first_corpus(fs) -> dict[str, list[str]]:
    corpus = {"a": texts("alpha", 6), "b": texts("beta", 6), "c": texts("gamma", 6)}
    for name, body in corpus.items():
        put(fs, f"corpus/docs/{name}.parquet", [f"{name}{i}" for i in range(6)], body)
    return corpus


def change_the_corpus(fs, corpus: dict[str, list[str]]) -> set[str]:
    """A new file, two rows of a edited, b renamed, c deleted; returns the ids whose rows must be computed."""
    put(fs, "corpus/docs/d.parquet", [f"d{i}" for i in range(4)], texts("delta", 4))
    edited = list(corpus["a"])
    edited[1], edited[4] = "An edited first sentence about lakes.", "Another edit, about the sea and its tides."
    put(fs, "corpus/docs/a.parquet", [f"a{i}" for i in range(6)], edited)
    fs.mv("corpus/docs/b.parquet", "corpus/docs/shard-0/b-renamed.parquet")
    fs.rm("corpus/docs/c.parquet")
    return {"d0", "d1", "d2", "d3", "a1", "a4"}


def changes_of(fs) -> dict:
    return json.loads(fs.cat_file(f"results/nightly/{CHANGES}"))


def test_a_rerun_computes_only_new_and_edited_rows_and_reuses_the_rest(ray_cluster, tiny_checkpoint, tmp_path, s3):
    endpoint, _, fs = s3
    fs.mkdir("corpus")
    fs.mkdir("results")
    corpus = the_first_corpus(fs)
    job = s3_job(tmp_path, tiny_checkpoint, endpoint)

    first = run_job(load_job(str(job)))
    assert first["rows_computed"] == 18 and first["rows_reused"] == 0
    assert first["changes"] == {"new": 18, "changed": 0, "unchanged": 0, "removed": 0}
    before = {r[C.ID]: r for r in read_output(fs, "results/nightly").to_pylist()}

    computed_ids = change_the_corpus(fs, corpus)
    # The dry run says before the rerun what it will compute and reuse, and writes nothing.
    preview = dry_run(load_job(str(job)), sample_rows=16)["units"]
    assert (preview["rows_to_compute"], preview["rows_reused"]) == (6, 10)
    assert preview["changes"] == {"new": 4, "changed": 2, "unchanged": 10}
    second = run_job(load_job(str(job)))
    # Exactly the 4 new and 2 edited rows went through the model; the 4 unedited rows of a and the 6 of the
    # renamed b were reused; c's units and a's and b's old units were retracted.
    assert second["rows_computed"] == len(computed_ids) == 6
    assert second["rows_reused"] == 10 and second["rows_out"] == 16 and second["complete"]
    assert second["changes"] == {"new": 4, "changed": 2, "unchanged": 10, "removed": 6}
    assert changes_of(fs)["rows"] == second["changes"] and changes_of(fs)["generation"] == 2

    out = read_output(fs, "results/nightly")
    ids = out.column(C.ID).to_pylist()
    assert sorted(ids) == sorted([f"{f}{i}" for f in "ab" for i in range(6)] + [f"d{i}" for i in range(4)])
    rows = {r[C.ID]: r for r in out.to_pylist()}
    for i in range(6):
        moved = rows[f"b{i}"]
        assert moved["input_file"].endswith("shard-0/b-renamed.parquet") and moved["input_row"] == i
        assert moved["summary"] == before[f"b{i}"]["summary"]
        assert moved[C.INPUT_HASH] == before[f"b{i}"][C.INPUT_HASH]
    for i in (1, 4):  # edited: a new hash, and its new row's result
        assert rows[f"a{i}"][C.INPUT_HASH] != before[f"a{i}"][C.INPUT_HASH]
    for i in (0, 2, 3, 5):
        assert rows[f"a{i}"]["summary"] == before[f"a{i}"]["summary"]

    third = run_job(load_job(str(job)))  # nothing changed: nothing computed, nothing reused, all unchanged
    assert third["rows_out"] == 0 and third["rows_skipped"] == 16
    assert third["changes"] == {"new": 0, "changed": 0, "unchanged": 16, "removed": 0}


# The crash is at the rerun's first commit, a unit of reused rows only (the renamed file's), committed before any
# compute. After its marker ("after-done", run by default; the others nightly) the resumed run must still count that
# unit's changes, which only its marker remembers.
@pytest.mark.parametrize("step", [pytest.param(s, marks=[] if s == "after-done" else [pytest.mark.slow])
                                  for s in COMMIT_STEPS])
def test_a_rerun_killed_at_a_commit_step_resumes_exactly_once_with_the_same_changes(step, ray_cluster, tiny_checkpoint,
                                                                                     tmp_path, s3):
    endpoint, _, fs = s3
    fs.mkdir("corpus")
    fs.mkdir("results")
    corpus = the_first_corpus(fs)
    job = s3_job(tmp_path, tiny_checkpoint, endpoint)
    run_job(load_job(str(job)))
    change_the_corpus(fs, corpus)

    proc = subprocess.run([sys.executable, "-m", "helpers.crash_driver", f"{step}:1", str(job), ray_cluster],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == CRASH_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-4000:]

    report = run_job(load_job(str(job)))
    ids = read_output(fs, "results/nightly").column(C.ID).to_pylist()
    assert len(ids) == len(set(ids)) == 16
    assert report["complete"] and report["rows_committed_total"] == 16
    assert report["changes"] == {"new": 4, "changed": 2, "unchanged": 10, "removed": 6}
    assert report["rows_computed"] == 6  # no edited or new row was computed by the killed run


def test_without_an_id_column_a_moved_file_is_reused_under_its_new_ids(ray_cluster, tiny_checkpoint, tmp_path, s3):
    endpoint, _, fs = s3
    fs.mkdir("corpus")
    fs.mkdir("results")
    put(fs, "corpus/docs/a.parquet", None, texts("alpha", 5))
    job = s3_job(tmp_path, tiny_checkpoint, endpoint, id_column=False)
    first = {r["input_row"]: r for r in read_after(job, fs)}
    fs.mv("corpus/docs/a.parquet", "corpus/docs/moved.parquet")
    report = run_job(load_job(str(job)))
    assert report["rows_computed"] == 0 and report["rows_reused"] == 5
    assert report["changes"] == {"new": 0, "changed": 0, "unchanged": 5, "removed": 0}
    rows = read_output(fs, "results/nightly").to_pylist()
    new_ids = derived_ids("s3://corpus/docs/moved.parquet", 0, 5).to_pylist()
    assert sorted(r[C.ID] for r in rows) == sorted(new_ids)
    for r in rows:
        assert r[C.ID] == new_ids[r["input_row"]] and r["summary"] == first[r["input_row"]]["summary"]


def read_after(job: Path, fs) -> list[dict]:
    run_job(load_job(str(job)))
    return read_output(fs, "results/nightly").to_pylist()


# ---- the input hash -----------------------------------------------------------------------------


def test_the_input_hash_follows_content_not_place(tmp_path):
    from pipeline.inputs import Unit

    body = texts("alpha", 4)
    for name in ("a", "b"):
        pq.write_table(pa.table({"id": pa.array(["x0", "x1", "x2", "x3"]), "text": body}), tmp_path / f"{name}.parquet")
    pq.write_table(pa.table({"id": pa.array(["x0", "x1", "x2", "x3"]), "text": body[:3] + ["edited"]}),
                   tmp_path / "c.parquet")

    def hashes(name: str, columns: dict, reused: tuple = ()) -> dict[int, str]:
        unit = Unit(key="k", uri=f"file://{tmp_path}/{name}.parquet", start=0, stop=4, reused=reused)
        blocks = list(read_unit(unit, columns, {}, 10))
        return {row: h for b in blocks for row, h in zip(b.column(C.ROW).to_pylist(),
                                                           b.column(C.INPUT_HASH).to_pylist())}

    with_ids = {"id": "id", "text": "text", "image": None}
    a, b, c = (hashes(n, with_ids) for n in "abc")
    assert a == b  # another file, same rows: same hashes
    assert [a[i] == c[i] for i in range(4)] == [True, True, True, False]  # only the edited row differs
    assert len(set(a.values())) == 4
    # The id is part of the hash where the job has an id_column, and not where ids come from the place.
    no_ids = hashes("a", {"id": None, "text": "text", "image": None})
    assert set(no_ids.values()).isdisjoint(a.values())
    # Reused rows are left out of what is read.
    assert sorted(hashes("a", with_ids, reused=(1, 2))) == [0, 3]


def test_a_duplicate_mark_is_part_of_the_hash_and_its_absence_is_not():
    plain = pa.table({C.ID: ["x", "y"], C.TEXT: [b"one", b"two"]})
    marked = plain.append_column(C.ID_ERROR, pa.array([None, C.DUPLICATE_ID])).append_column(
        C.ID_ERROR_MESSAGE, pa.array([None, "id 'y' appears earlier"]))
    a, b = row_hashes(plain, derived_id=False).to_pylist(), row_hashes(marked, derived_id=False).to_pylist()
    assert a[0] == b[0] and a[1] != b[1]
