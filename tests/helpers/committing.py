"""A bench for pipeline.commit.Committer without Ray or a checkpoint: a real Validated and finished rows.

`bench(output_path, files)` builds the Validated that run.validate would return for a job over
input files of the given sizes: a real JobSpec (parsed from a job file), real units
(inputs.make_units) and a real OutputStore on `output_path` (a local directory or an s3:// URI;
give `storage` for the endpoint). The checkpoint and the input files are never opened, so tests of
the commit protocol run in milliseconds. `committer(v)` makes the run's Committer;
`finished_rows(v, unit, rows)` gives rows of a unit as
the plan hands them to the committer (internal __unit/__row columns plus every output column).
`part_ids(store)` reads back the ids of every part file.

Not here: real end-to-end runs (tests/pipeline/test_run.py uses the whole pipeline).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from helpers.pipeline_data import job_toml
from operators import columns as C
from pipeline.commit import Committer, OutputStore
from pipeline.inputs import InputFile, Unit, derived_ids, make_units
from pipeline.spec import load_job
from pipeline.validate import Validated

ONE_TASK = """
[[task]]
kind = "summarize"
max_new_tokens = 4
"""
INPUT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.binary())])


def bench(output_path: str, files: list[tuple[str, int]], rows_per_file: int = 4, storage: str = "") -> Validated:
    """The Validated of a one-task job over input files given as (uri, row count)."""
    spec = load_job(job_toml("/checkpoint/never/opened", "/input/never/read/*.parquet", output_path, tasks=ONE_TASK,
                             storage=storage, rows_per_file=rows_per_file))
    run_hash = spec.run_config_hash()
    inputs = [InputFile(uri=uri, num_rows=n, schema=INPUT_SCHEMA) for uri, n in files]
    store = OutputStore(spec.output.path, spec.storage_options(spec.output.path))
    return Validated(spec=spec, files=tuple(inputs), units=tuple(make_units(inputs, rows_per_file, run_hash)),
                     id_type=pa.string(), model_revision=None, run_hash=run_hash, store=store,
                     weight_bytes=0)


def committer(v: Validated, todo: list[Unit] | None = None, **hooks) -> Committer:
    """The Committer run.py would make for `v` (all its units unless `todo`); `hooks` as Committer takes."""
    return Committer(v.store, C.output_schema(v.output_columns, v.id_type), v.spec.output.compression,
                     list(v.units) if todo is None else todo, v.output_columns, **hooks)


def unit_ids(unit: Unit) -> list[str]:
    return derived_ids(unit.uri, unit.start, unit.stop).to_pylist()


def finished_rows(v: Validated, unit: Unit, rows: list[int] | None = None) -> pa.Table:
    """Rows `rows` (file row numbers; all of the unit by default) as finish hands them back."""
    rows = list(range(unit.start, unit.stop)) if rows is None else list(rows)
    ids = [unit_ids(unit)[r - unit.start] for r in rows]
    n = len(rows)
    columns = {C.UNIT: pa.array([unit.key] * n, pa.string()), C.ROW: pa.array(rows, pa.int64()),
               C.ID: pa.array(ids, pa.string()), C.INPUT_HASH: pa.array([f"hash of {i}" for i in ids], pa.string()),
               C.ERROR_KIND: pa.nulls(n, pa.string()), C.ERROR_MESSAGE: pa.nulls(n, pa.string())}
    for name in v.output_columns:
        cols = C.TaskColumns.of(name)
        columns[cols.text] = pa.array([f"output of {i}" for i in ids], pa.string())
        columns[cols.input_tokens] = pa.array([7] * n, pa.int32())
        columns[cols.output_tokens] = pa.array([3] * n, pa.int32())
        columns[cols.finish_reason] = pa.array(["eos"] * n, pa.string())
        columns[cols.flags] = pa.array([[]] * n, pa.list_(pa.string()))
        columns[cols.chunks] = pa.array([1] * n, pa.int32())
        columns[cols.chunk_depth] = pa.array([0] * n, pa.int32())
        columns[cols.error_kind] = pa.nulls(n, pa.string())
        columns[cols.error_message] = pa.nulls(n, pa.string())
    for key, value in v.provenance.items():
        columns[key] = pa.array([value] * n, pa.string())
    return pa.table(columns)


def part_ids(store: OutputStore) -> dict[str, list]:
    """Part file key -> the ids it holds, in file order."""
    out = {}
    for key in store.parts():
        with store.fs.open(store.part_path(key), "rb") as handle:
            out[key] = pq.read_table(handle).column(C.ID).to_pylist()
    return out
