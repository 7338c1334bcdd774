"""Exactly-once when the input changes between runs, as a nightly job over a living corpus sees it.

Each test runs the real pipeline on the session's local Ray, changes the input the way a corpus
changes (a file grows, is rewritten, renamed or removed; the same id appears twice; the output
is put where the input is read from), reruns, and checks what a reader of the output sees: one
row per current input row, none for rows that are gone, and a run report that agrees with the
directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from helpers.pipeline_data import IMAGE_STRUCT, job_toml
from operators import columns as C
from pipeline.run import run_job
from pipeline.spec import JobError, load_job

TASK = """
[[task]]
kind = "summarize"
max_new_tokens = 3
"""


def write_file(path: Path, ids: list[str], texts: list[str] | None = None) -> None:
    texts = texts or [f"Document number {i} says something about {i}." for i in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, type=pa.string()), "text": texts,
                             "image": pa.nulls(len(ids), IMAGE_STRUCT)}), path, row_group_size=4)


def job(checkpoint, input_path, output_path, extra_input: str = "") -> str:
    return job_toml(str(checkpoint), input_path, str(output_path), tasks=TASK, rows_per_file=10,
                    extra_input=extra_input)


def output_rows(out: Path) -> list[dict]:
    return pads.dataset(str(out), format="parquet").to_table().to_pylist()


def check_directory_agrees(out: Path, report: dict, rows_in: int) -> None:
    """Part files and done-markers are one per unit of the current input, and hold rows_in rows."""
    parts = sorted(p.name[len("part-"):-len(".parquet")] for p in out.glob("part-*.parquet"))
    markers = sorted(p.stem for p in (out / "_done").glob("*.json"))
    assert parts == markers and len(parts) == report["units_total"]
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("part-*.parquet")) == rows_in
    assert report["units_computed"] + report["units_reused"] == report["units_total"]
    assert report["rows_committed_total"] == rows_in and report["complete"]


def test_a_file_that_grows_or_is_rewritten_is_computed_again(ray_cluster, tiny_checkpoint, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_file(src / "a.parquet", [f"a{i}" for i in range(25)])
    write_file(src / "b.parquet", [f"b{i}" for i in range(7)])
    text = job(tiny_checkpoint, f"{src}/*.parquet", out)
    first = run_job(load_job(text))

    # a.parquet grows from 25 to 40 rows: its old units (and their markers) are retracted.
    write_file(src / "a.parquet", [f"a{i}" for i in range(40)])
    report = run_job(load_job(text))
    rows = output_rows(out)
    ids = [r[C.ID] for r in rows]
    assert sorted(ids) == sorted([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(7)])
    assert first["units_computed"] == 4 and first["units_retracted"] == 0
    assert report["units_computed"] == 4 and report["units_reused"] == 1 and report["units_retracted"] == 3
    assert report["rows_retracted"] == 25
    check_directory_agrees(out, report, 47)

    # Rewritten with the same row count but other rows: the output follows the new content.
    write_file(src / "b.parquet", [f"c{i}" for i in range(7)])
    report = run_job(load_job(text))
    assert sorted(r[C.ID] for r in output_rows(out)) == sorted([f"a{i}" for i in range(40)] +
                                                                [f"c{i}" for i in range(7)])
    assert report["units_computed"] == 1 and report["units_retracted"] == 1
    check_directory_agrees(out, report, 47)


def test_renamed_and_removed_files_leave_no_rows_behind(ray_cluster, tiny_checkpoint, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b", "c"):
        write_file(src / f"{name}.parquet", [f"{name}{i}" for i in range(10)])
    text = job(tiny_checkpoint, f"{src}/*.parquet", out)
    run_job(load_job(text))

    os.rename(src / "a.parquet", src / "z.parquet")  # renamed: recomputed under its new name
    (src / "b.parquet").unlink()  # removed: its rows leave the output
    report = run_job(load_job(text))
    rows = output_rows(out)
    assert sorted(r[C.ID] for r in rows) == sorted([f"a{i}" for i in range(10)] + [f"c{i}" for i in range(10)])
    assert {r["input_file"].rsplit("/", 1)[-1] for r in rows} == {"z.parquet", "c.parquet"}
    assert report["units_computed"] == 1 and report["units_reused"] == 1 and report["units_retracted"] == 2
    assert report["rows_skipped"] == 10 and report["rows_retracted"] == 20
    check_directory_agrees(out, report, 20)
    summary = json.loads((out / "_report.json").read_text())
    assert summary["units_retracted"] == 2


@pytest.mark.parametrize("where", ["equal", "inside-dir", "glob-matches-output"])
def test_output_inside_the_input_fails_validation(tiny_checkpoint, tmp_path, where):
    src = tmp_path / "in"
    write_file(src / "a.parquet", [f"a{i}" for i in range(5)])
    input_path, output_path = {
        "equal": (str(src), src),
        "inside-dir": (str(src), src / "results"),
        "glob-matches-output": (f"{tmp_path}/**/*.parquet", tmp_path / "in" / "out"),
    }[where]
    with pytest.raises(JobError, match=r"output.path .* is inside input.path .*would read its own output"):
        run_job(load_job(job(tiny_checkpoint, input_path, output_path)))
    assert not list(Path(output_path).glob("part-*"))


def test_output_beside_the_input_is_fine(ray_cluster, tiny_checkpoint, tmp_path):
    src = tmp_path / "data"
    write_file(src / "a.parquet", [f"a{i}" for i in range(5)])
    out = src / "summaries"  # inside the directory, but the glob reads only the top level
    text = job(tiny_checkpoint, f"{src}/*.parquet", out)
    for _ in range(2):
        report = run_job(load_job(text))
    assert len(output_rows(out)) == 5 and report["rows_committed_total"] == 5


def test_duplicate_ids_become_error_rows_naming_the_first(ray_cluster, tiny_checkpoint, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_file(src / "a.parquet", ["x", "y", "x", "z"])  # "x" twice in one unit
    write_file(src / "b.parquet", ["w", "y", "v"])  # "y" again, in another file
    report = run_job(load_job(job(tiny_checkpoint, f"{src}/*.parquet", out)))
    rows = output_rows(out)
    assert len(rows) == 7 and len({r[C.ID] for r in rows}) == 5
    assert report["complete"]
    by_place = {(r["input_file"].rsplit("/", 1)[-1], r["input_row"]): r for r in rows}
    assert set(by_place) == {("a.parquet", i) for i in range(4)} | {("b.parquet", i) for i in range(3)}
    for place in [("a.parquet", 0), ("a.parquet", 1), ("a.parquet", 3), ("b.parquet", 0), ("b.parquet", 2)]:
        assert by_place[place][C.ERROR_KIND] is None and by_place[place]["summary"] is not None
    second_x, second_y = by_place[("a.parquet", 2)], by_place[("b.parquet", 1)]
    for row, first in ((second_x, "a.parquet row 0"), (second_y, "a.parquet row 1")):
        assert row[C.ERROR_KIND] == "duplicate_id" and row["summary_error_kind"] == "duplicate_id"
        assert first in row[C.ERROR_MESSAGE] and row["summary"] is None
    assert report["errors_by_kind"] == {"duplicate_id": 2}


def test_unique_ids_fails_before_work(tiny_checkpoint, tmp_path, monkeypatch):
    from pipeline import run as run_module

    monkeypatch.setattr(run_module, "_connect", lambda address=None: pytest.fail("Ray was touched"))
    src = tmp_path / "in"
    write_file(src / "a.parquet", ["x", "y"])
    write_file(src / "b.parquet", ["q", "x"])
    text = job(tiny_checkpoint, f"{src}/*.parquet", tmp_path / "out", extra_input="unique_ids = true")
    with pytest.raises(JobError, match=r"input.unique_ids .*'x' .*a.parquet row 0 .*b.parquet row 1"):
        run_job(load_job(text))
