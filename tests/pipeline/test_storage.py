"""Input listing and reading by row range; the output store's publish / mark / clean protocol,
on local disk and on S3 (moto)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.pipeline_data import IMAGE_STRUCT
from operators import columns as C
from pipeline import commit
from pipeline import inputs as input_module
from pipeline.commit import OutputStore
from pipeline.inputs import Unit, list_inputs, make_units, read_footers, read_unit
from pipeline.paths import StorageError


def _table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({
        "id": pa.array(range(offset, offset + n), type=pa.int64()),
        "text": pa.array([f"row {i}" for i in range(offset, offset + n)], type=pa.string()),
        "image": pa.array([{"bytes": bytes([i % 256]) * 3, "path": f"{i}.png"} for i in range(n)], type=IMAGE_STRUCT),
        "big": pa.array([b"x" * 100] * n, type=pa.binary()),
    })


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    pq.write_table(_table(23), d / "a.parquet", row_group_size=4)
    pq.write_table(_table(5, 100), d / "sub" / "b.parquet", row_group_size=2)
    pq.write_table(_table(1), d / "_hidden.parquet")
    (d / "notes.txt").write_text("not parquet")
    return d


def test_listing(inputs):
    a, b = f"file://{inputs}/a.parquet", f"file://{inputs}/sub/b.parquet"
    # A glob is taken as written.
    assert list_inputs((f"{inputs}/*.parquet",), {}) == [f"file://{inputs}/_hidden.parquet", a]
    assert list_inputs((str(inputs),), {}) == [a, b]  # a directory: its .parquet files, _ and . skipped
    assert list_inputs((f"{inputs}/a.parquet", f"file://{inputs}/a.parquet", f"{inputs}/sub/*"), {}) == [a, b]
    with pytest.raises(StorageError, match="matches no file"):
        list_inputs((f"{inputs}/*.csv",), {})
    files = read_footers([a, b], {})
    assert [f.num_rows for f in files] == [23, 5] and files[0].schema.field("image").type == IMAGE_STRUCT
    with pytest.raises(StorageError, match="not a readable Parquet file"):
        read_footers([f"file://{inputs}/notes.txt"], {})


def test_units_are_deterministic_row_ranges(inputs):
    files = read_footers(list_inputs((str(inputs),), {}), {})
    units = make_units(files, 10, "hash1")
    assert [(u.start, u.stop) for u in units] == [(0, 10), (10, 20), (20, 23), (0, 5)]
    assert [u.key for u in units] == [u.key for u in make_units(files, 10, "hash1")]
    assert not {u.key for u in units} & {u.key for u in make_units(files, 10, "hash2")}
    assert len({u.key for u in units}) == 4 and all(len(u.key) == 32 for u in units)


def test_read_unit_reads_a_row_range_and_only_needed_columns(inputs):
    uri = f"file://{inputs}/a.parquet"
    unit = Unit(key="k", uri=uri, start=6, stop=17)  # across row groups of 4
    blocks = list(read_unit(unit, {"id": "id", "text": "text", "image": "image"}, {}, block_rows=5))
    assert [b.num_rows for b in blocks] == [5, 5, 1]
    table = pa.concat_tables(blocks)
    assert table.column_names == [C.UNIT, C.ROW, C.ID, C.TEXT, C.IMAGE, C.INPUT_HASH]  # "big" is never read
    assert table.column(C.ROW).to_pylist() == list(range(6, 17)) == table.column(C.ID).to_pylist()
    assert table.column(C.TEXT).type == pa.binary() and table.column(C.TEXT)[0].as_py() == b"row 6"
    assert table.column(C.IMAGE)[0].as_py() == bytes([6]) * 3
    # Without an id column, ids derive from the file and the row: stable, distinct per file.
    derived = pa.concat_tables(read_unit(unit, {"text": "text"}, {}, block_rows=100)).column(C.ID).to_pylist()
    again = pa.concat_tables(read_unit(unit, {"text": "text"}, {}, block_rows=100)).column(C.ID).to_pylist()
    other = input_module.derived_ids(f"file://{inputs}/sub/b.parquet", 6, 17).to_pylist()
    assert derived == again and len(set(derived)) == 11 and not set(derived) & set(other)
    assert all(str(inputs) not in d for d in derived)


def _store_roundtrip(store: OutputStore, listing):
    table = pa.table({"id": ["a", "b"], "x": [1, 2]})
    store.probe()
    assert store.done() == {} and store.parts() == []
    store.publish("k1", table, "zstd")
    store.mark_done("k1", {"rows": 2})
    store.publish("k2", table, "none")  # published, but the run died before its marker
    assert store.done() == {"k1": {"rows": 2}} and sorted(store.parts()) == ["k1", "k2"]
    assert store.clean_leftovers({"k1"}) >= 1
    assert store.parts() == ["k1"]
    assert not any("_probe" in name for name in listing())
    store.write_json("_job.json", {"a": 1})
    assert store.read_json("_job.json") == {"a": 1} and store.read_json("_nothing.json") is None


def test_output_store_local(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    _store_roundtrip(store, lambda: [str(p) for p in (tmp_path / "out").rglob("*")])
    assert pq.read_table(tmp_path / "out").num_rows == 2  # readers skip _done/, _job.json


def test_local_publish_never_exposes_a_partial_file(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path / "out"), {})

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(commit.os, "replace", crash)
    with pytest.raises(OSError):
        store.publish("k", pa.table({"x": [1]}), "zstd")
    assert not os.path.exists(store.part_path("k"))  # only scratch is left, and a rerun removes it
    monkeypatch.undo()
    assert os.listdir(tmp_path / "out" / "_tmp")
    assert store.clean_leftovers(set()) == 1 and not os.listdir(tmp_path / "out" / "_tmp")


def test_output_store_s3(s3):
    endpoint, options, fs = s3
    fs.mkdir("results")
    store = OutputStore("s3://results/job/", {"endpoint_url": endpoint})
    _store_roundtrip(store, lambda: fs.find("results"))
    assert not fs.exists("results/job/_tmp")  # object stores publish in one request, no scratch
    with pytest.raises(StorageError, match="not writable"):
        OutputStore("s3://missing-bucket/x", {"endpoint_url": endpoint}).probe()


def test_a_rewritten_file_gets_new_unit_keys_and_a_change_mid_run_is_refused(inputs):
    uri = f"file://{inputs}/a.parquet"
    before = read_footers([uri], {})
    assert before[0].identity.startswith("size=") and "mtime=" in before[0].identity
    os.utime(inputs / "a.parquet", ns=(1, 1))  # the same bytes, rewritten at another time
    after = read_footers([uri], {})
    assert after[0].identity != before[0].identity
    assert not {u.key for u in make_units(before, 10, "h")} & {u.key for u in make_units(after, 10, "h")}
    unit = Unit(key="k", uri=uri, start=0, stop=5, identity=before[0].identity)
    with pytest.raises(StorageError, match="changed during the run"):
        list(read_unit(unit, {"id": "id"}, {}, block_rows=5))


def test_s3_files_are_identified_by_their_etag(s3):
    endpoint, options, fs = s3
    fs.mkdir("corpus")
    pq.write_table(_table(3), "/tmp/t5g2-etag.parquet")
    fs.put("/tmp/t5g2-etag.parquet", "corpus/a.parquet")
    first = read_footers(["s3://corpus/a.parquet"], {"endpoint_url": endpoint})[0].identity
    pq.write_table(_table(3, 50), "/tmp/t5g2-etag.parquet")  # other rows, same count
    fs.put("/tmp/t5g2-etag.parquet", "corpus/a.parquet")
    second = read_footers(["s3://corpus/a.parquet"], {"endpoint_url": endpoint})[0].identity
    os.remove("/tmp/t5g2-etag.parquet")
    assert "etag=" in first and first != second


def test_duplicate_ids_are_found_exactly_first_occurrence_kept(tmp_path):
    def write(name, ids, type_):
        pq.write_table(pa.table({"id": pa.array(ids, type=type_)}), tmp_path / name)
        return f"file://{tmp_path}/{name}"

    a = write("a.parquet", ["x", None, "y", "x", None], pa.string())
    b = write("b.parquet", ["y", "z", "x"], pa.large_string())  # string and large_string ids compare alike
    found = input_module.find_duplicate_ids(read_footers([a, b], {}), "id", {})
    assert {uri: sorted(rows) for uri, rows in found.items()} == {a: [3], b: [0, 2]}  # nulls repeat nothing
    assert (found[b][0].first_uri, found[b][0].first_row) == (a, 2)
    assert (found[b][2].first_uri, found[b][2].first_row) == (a, 0)
    assert "appears earlier in the input, at" in found[a][3].message()
    ints = [write("c.parquet", [5, 6, 7], pa.int32()), write("d.parquet", [7, 8], pa.int64())]
    found = input_module.find_duplicate_ids(read_footers(ints, {}), "id", {})
    assert {uri: sorted(rows) for uri, rows in found.items()} == {ints[1]: [0]}
    units = make_units(read_footers(ints, {}), 10, "h", found)
    assert units[0].duplicates == () and units[1].duplicates[0][0] == 0
    assert units[1].key != make_units(read_footers(ints, {}), 10, "h")[1].key  # the marks are part of the key


def test_retract_deletes_parts_and_markers_of_units_no_longer_planned(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    store.probe()
    for key, rows in (("keep", 2), ("gone", 3)):
        store.publish(key, pa.table({"x": list(range(rows))}), "zstd")
        store.mark_done(key, {"rows": rows})
    store.mark_done("orphan-marker", {"rows": 4})  # a crash between deleting a part and its marker
    done = store.done()
    assert store.retract({"keep"}, done) == (2, 7)
    assert store.parts() == ["keep"] and list(store.done()) == ["keep"]
    assert store.retract({"keep"}, store.done()) == (0, 0)
