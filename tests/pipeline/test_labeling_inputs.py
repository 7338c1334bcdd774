"""The input side of the labeling tasks: every column a job names (prompt fields, prompt_column,
labels_column, keep_columns) is checked against the input files' footers before any work, and the
read stage gives each one to the plan, per file, with the schema-drift policy. Real Parquet files,
the tiny real checkpoint, validation as `t5g2 run` does it (no Ray)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators import columns as C
from pipeline.inputs import ExtraColumn, keep_output_type, read_unit
from pipeline.spec import JobError, load_job
from pipeline.validate import validate


def write(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture
def files(tmp_path):
    """Two files: a has every column; b lacks title and holds cands as plain strings (drift), its url
    as large_string and its year as int64 (both unify with a's)."""
    a = pa.table({"id": ["a0", "a1", "a2"], "text": ["one", "two", "three"], "title": ["T0", None, "T2"],
                  "year": pa.array([1999, 2000, None], pa.int32()), "question": ["q0", "q1", "q2"],
                  "cands": pa.array([["x", "y"], None, []], pa.list_(pa.string())), "prompt": ["p0", "p1", None],
                  "url": ["u0", "u1", "u2"], "n": pa.array([1, 2, 3], pa.int64())})
    b = pa.table({"id": ["b0", "b1"], "text": ["four", "five"], "year": pa.array([7, 8], pa.int64()),
                  "question": ["q3", "q4"], "cands": ["x", "y"], "prompt": ["p3", "p4"],
                  "url": pa.array(["u3", "u4"], pa.large_string()), "n": ["1", "2"]})
    return write(tmp_path / "in" / "a.parquet", a), write(tmp_path / "in" / "b.parquet", b)


def job(checkpoint, tmp_path, tasks: str, output: str = "") -> str:
    return f"""
[model]
source = "{checkpoint}"
dtype = "float32"

[input]
path = "{tmp_path}/in/*.parquet"
id_column = "id"
text_column = "text"

[output]
path = "{tmp_path}/out"
{output}

{tasks}
"""


GENERATE = '[[task]]\nkind = "generate"\nprompt = "{title} ({year}): {question}"\n'
CLASSIFY = '[[task]]\nkind = "classify"\nlabels_column = "cands"\n'


@pytest.mark.parametrize("tasks, message", [
    ('[[task]]\nkind = "generate"\nprompt = "{subtitle}: {question}"\n',
     r"task\[0\].prompt field 'subtitle' is not a column of any of the 2 input files; fix task\[0\]"
     r".prompt .* \(e.g. .*a.parquet has: id, text, title, year, question, cands, prompt, url, n\)"),
    ('[[task]]\nkind = "generate"\nprompt_column = "instruction"\n',
     r"task\[0\].prompt_column 'instruction' is not a column of any of the 2 input files; set task\[0\].prompt_column "
     r"to a column they have"),
    ('[[task]]\nkind = "classify"\nlabels_column = "cand"\n',
     r"task\[0\].labels_column 'cand' is not a column of any.*\(did you mean 'cands'\?\)"),
    ('[[task]]\nkind = "classify"\nlabels_column = "question"\n',
     r"no input file has a usable task\[0\].labels_column: task\[0\].labels_column 'question' in .* has type string; "
     r"labels must be a list of "
     r"strings"),
])
def test_a_task_column_no_file_has_fails_before_any_work_naming_it(tiny_checkpoint, tmp_path, files, tasks, message):
    with pytest.raises(JobError, match=message):
        validate(load_job(job(tiny_checkpoint, tmp_path, tasks)))
    assert not list((tmp_path / "out").glob("part-*"))


@pytest.mark.parametrize("keep, message", [
    ('["title"]', r"output.keep_columns names 'title', which is not a column of .*b.parquet \(columns: id, text, year"),
    ('["n"]', r"output.keep_columns 'n' has no one type across the input files: types int64, string have no common "
              r"type"),
])
def test_keep_columns_every_file_lacks_or_disagrees_on_fail_before_any_work(tiny_checkpoint, tmp_path, files, keep,
                                                                            message):
    with pytest.raises(JobError, match=message):
        validate(load_job(job(tiny_checkpoint, tmp_path, GENERATE, f"keep_columns = {keep}")))


def test_columns_some_files_lack_are_per_row_errors_and_every_column_reads_typed(tiny_checkpoint, tmp_path, files,
                                                                                 caplog):
    caplog.set_level(logging.WARNING, logger="pipeline")
    v = validate(load_job(job(tiny_checkpoint, tmp_path, GENERATE + CLASSIFY, 'keep_columns = ["url", "year"]')))
    assert [(f.name, f.type) for f in v.keep] == [("url", pa.large_string()), ("year", pa.int64())]
    assert {(e.column, e.role) for e in v.extra} == {("title", "field"), ("year", "field"), ("question", "field"),
                                                     ("cands", "labels"), ("url", "keep"), ("year", "keep")}
    assert "task[0].prompt field 'title': 1 of 2 input files cannot provide it" in caplog.text
    assert "task[1].labels_column 'cands': 1 of 2 input files cannot provide it" in caplog.text
    schema = C.output_schema(v.output_tasks, v.id_type, list(v.keep))
    assert schema.names[:3] == ["id", "url", "year"] and schema.field("label_scores").type == C.SCORES_TYPE
    assert "output_finish_reason" in schema.names and "label_finish_reason" not in schema.names

    columns = {"id": "id", "text": None, "image": None}
    a, b = (pa.concat_tables(read_unit(u, columns, {}, 100, v.extra)) for u in v.units)
    assert a.column(C.field_column("year")).to_pylist() == [b"1999", b"2000", None]  # numbers as text
    assert a.column(C.field_column("title")).to_pylist() == [b"T0", None, b"T2"]
    assert a.column(C.labels_column("cands")).to_pylist() == [["x", "y"], None, []]
    assert a.column(C.keep_column("year")).type == pa.int64()  # keep columns in their output type
    assert b.column(C.keep_column("url")).to_pylist() == ["u3", "u4"]
    for name in (C.field_column("title"), C.labels_column("cands")):
        kind, message = C.read_error_columns(name)
        assert kind not in a.column_names
        assert b.column(kind).to_pylist() == [C.COLUMN_MISSING if "title" in name else C.COLUMN_TYPE] * 2
        assert all(str(files[1]) in m for m in b.column(message).to_pylist())
        assert b.column(name).null_count == 2


def test_read_unit_refuses_a_file_that_lost_a_keep_column(tmp_path):
    path = write(tmp_path / "x.parquet", pa.table({"id": ["a"]}))
    from pipeline.inputs import Unit
    from pipeline.paths import StorageError

    unit = Unit(key="k", uri=str(path), start=0, stop=1)
    with pytest.raises(StorageError, match=r"no column 'url' \(output.keep_columns\) any more"):
        list(read_unit(unit, {"id": "id"}, {}, 10, (ExtraColumn("url", "keep", pa.string()),)))


def test_keep_output_type_unifies_what_casts_and_refuses_what_does_not():
    assert keep_output_type([pa.int32(), pa.int64()]) == pa.int64()
    assert keep_output_type([pa.string(), pa.large_string()]) == pa.large_string()
    assert keep_output_type([pa.null(), pa.string()]) == pa.string()
    with pytest.raises(ValueError, match="no common type"):
        keep_output_type([pa.int64(), pa.string()])
