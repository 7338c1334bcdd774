"""End-to-end runs on a local Ray: local files and S3 (moto), resume after a killed driver, batch
invariance, and jobs that must fail before any inference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from helpers.actor_faults import FAULTY
from helpers.crash_driver import CRASH_EXIT_CODE
from helpers.pipeline_data import job_toml, mixed_rows, write_inputs
from operators import columns as C
from pipeline import run as run_module
from pipeline.run import run_job
from pipeline.spec import JobError, load_job

REPO = Path(__file__).resolve().parents[2]
TEXT_TASKS = ("summary", "german")
IMAGE_TASKS = ("caption",)


def read_output(path: str, filesystem=None):
    """The output as a reader sees it: pyarrow.dataset over the directory (names with _ skipped)."""
    return pads.dataset(path, format="parquet", filesystem=filesystem).to_table()


def check_output(table, rows, expected):
    """One output row per input row, ids equal, good rows have text, bad rows the right kind."""
    ids = table.column(C.ID).to_pylist()
    assert len(ids) == len(rows) == len(set(ids))
    assert set(ids) == {r["id"] for r in rows}
    by_id = {r[C.ID]: r for r in table.to_pylist()}
    for row_id, row in by_id.items():
        want = expected.get(row_id, {})
        for family, columns in (("text", TEXT_TASKS), ("image", IMAGE_TASKS)):
            for col in columns:
                kind = want.get(family)
                if kind is None:
                    assert row[f"{col}_error_kind"] is None, (row_id, col, row[f"{col}_error_message"])
                    assert isinstance(row[col], str) and row[f"{col}_output_tokens"] >= 1
                    assert row[f"{col}_finish_reason"] in ("eos", "length")
                    assert row[f"{col}_input_tokens"] > 0
                    flags = row[f"{col}_flags"]
                    assert set(flags) <= set(C.QUALITY_FLAGS)
                    assert ("max_new_tokens" in flags) == (row[f"{col}_finish_reason"] == "length")
                else:
                    assert row[f"{col}_error_kind"] == kind, (row_id, col, row[f"{col}_error_message"])
                    assert row[f"{col}_error_message"] and row[col] is None
                    assert row[f"{col}_finish_reason"] is None and row[f"{col}_flags"] is None
        if want:
            assert row[C.ERROR_KIND] == next(iter(want.values()))
        else:
            assert row[C.ERROR_KIND] is None and row[C.ERROR_MESSAGE] is None
        assert row[C.RUN_CONFIG_HASH] and row[C.MODEL_SOURCE]


@pytest.fixture(scope="module")
def dataset():
    return mixed_rows()


def test_end_to_end_local(ray_cluster, tiny_checkpoint, dataset, tmp_path, caplog):
    caplog.set_level("INFO", logger="pipeline")
    rows, expected = dataset
    write_inputs(rows, str(tmp_path / "in"))
    out = tmp_path / "out"
    report = run_job(load_job(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out))))
    table = read_output(str(out))
    check_output(table, rows, expected)
    assert pq.read_table(out).num_rows == len(rows)  # the plain reader agrees
    assert report["rows_in"] == report["rows_out"] == len(rows) and report["complete"]
    assert report["errors_by_kind"]["image_too_large"] == 1
    assert report["tasks"]["summary"]["errors_by_kind"]["text_invalid_utf8"] == 1
    for task in report["tasks"].values():  # the report counts the flags the rows carry
        assert task["flags"].get("max_new_tokens", 0) == task["finish_reasons"].get("length", 0)
    assert report["input_tokens"] > 0 and report["output_tokens"] > 0 and report["rows_per_second"] > 0
    assert json.loads((out / "_report.json").read_text())["rows_out"] == len(rows)
    assert "rows in 29" in caplog.text  # the summary the command line prints
    # What the CPU actor did, summed from the records its model calls left on their first rows.
    engine = report["engine"]
    assert engine["model_calls"] >= 1 and engine["devices"] == {"cpu": engine["model_calls"]}
    assert engine["generated_tokens"] == report["output_tokens"] and engine["model_seconds"] > 0
    assert 1 <= sum(engine["decode"].values()) <= engine["model_calls"] and engine["compile_fallbacks"] == {}
    assert 0 < engine["slot_occupancy"] <= 1 and "engine: " in caplog.text
    markers = [json.loads(p.read_text()) for p in (out / "_done").iterdir()]
    assert sum(m.get("engine", {}).get("calls", 0) for m in markers) == engine["model_calls"]
    assert C.ENGINE not in table.column_names
    names = os.listdir(out)
    assert all(n.startswith(("part-", "_")) for n in names)
    assert not any(r["id"] in n for n in names for r in rows)  # names are hashes, never ids


def test_end_to_end_s3(ray_cluster, tiny_checkpoint, dataset, s3):
    endpoint, options, fs = s3
    rows, expected = dataset
    for bucket in ("corpus", "models", "results"):
        fs.mkdir(bucket)
    fs.put(str(tiny_checkpoint) + "/", "models/tiny/", recursive=True)
    write_inputs(rows, "corpus/docs", fs=fs)
    storage = f'[storage.s3]\nendpoint_url = "{endpoint}"\n'
    text = job_toml("s3://models/tiny/", "s3://corpus/docs/*.parquet", "s3://results/run1/", storage=storage)
    report = run_job(load_job(text))
    assert report["rows_out"] == len(rows) and report["complete"]
    fs.invalidate_cache()
    table = read_output("results/run1", filesystem=fs)
    check_output(table, rows, expected)
    found = fs.find("results/run1")
    listing = [p.split("/")[-1] for p in found]
    parts = [n for n in listing if n.startswith("part-")]
    markers = [p for p in found if "/_done/" in p]
    assert len(parts) == len(markers) == report["units_total"] == report["units_computed"]
    assert "_report.json" in listing and not any(n.startswith("_probe") for n in listing)
    for p in fs.find("results/run1"):
        if p.endswith(".parquet"):
            assert pq.ParquetFile(fs.open(p)).metadata.num_rows > 0
            meta = pq.ParquetFile(fs.open(p)).schema_arrow.metadata or {}
            assert not any(b"testing" in v for v in meta.values())  # no credentials in metadata


def _files(out: Path) -> dict[str, float]:
    """Every output file a rerun must leave as it is: all but the records each complete run writes anew."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.name not in ("_report.json", "_changes.json")}


def test_resume_after_killed_driver(ray_cluster, tiny_checkpoint, dataset, tmp_path):
    rows, expected = dataset
    write_inputs(rows, str(tmp_path / "in"))
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out), rows_per_file=3))

    # Run 1: a separate driver process joins the session's Ray and dies abruptly after 3 commits.
    proc = subprocess.run([sys.executable, "-m", "helpers.crash_driver", "after-done:3", str(job), ray_cluster],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == CRASH_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-4000:]
    markers = list((out / "_done").glob("*.json"))
    assert len(markers) == 3
    committed_rows = sum(json.loads(m.read_text())["rows"] for m in markers)
    partial = read_output(str(out))  # what a reader sees after the crash: whole files only
    assert partial.num_rows == committed_rows == 9
    assert len(set(partial.column(C.ID).to_pylist())) == committed_rows

    # Run 2: computes only what is missing.
    report = run_job(load_job(str(job)))
    assert report["rows_skipped"] == committed_rows and report["units_reused"] == 3
    assert report["rows_out"] == len(rows) - committed_rows
    assert report["units_computed"] == report["units_total"] - 3 and report["complete"]
    check_output(read_output(str(out)), rows, expected)

    # Run 3: a crash between publishing a part file and its marker, scratch left behind, and an
    # unmarked part file of a unit the job no longer has: exactly that unit is recomputed and
    # replaced under the same name; the scratch and the orphan are removed.
    before = set(_files(out))
    victim = sorted((out / "_done").glob("*.json"))[0]
    victim_rows = json.loads(victim.read_text())["rows"]
    victim.unlink()
    (out / "_tmp" / "dead.tmp").write_bytes(b"half a file")
    (out / ("part-" + "0" * 32 + ".parquet")).write_bytes((out / f"part-{victim.stem}.parquet").read_bytes())
    report = run_job(load_job(str(job)))
    assert report["rows_out"] == victim_rows and report["units_computed"] == 1
    assert set(_files(out)) == before
    check_output(read_output(str(out)), rows, expected)

    # Run 4: everything is done, nothing is written.
    snapshot = _files(out)
    report = run_job(load_job(str(job)))
    assert report["rows_out"] == 0 and report["units_computed"] == 0 and report["complete"]
    assert _files(out) == snapshot


def _texts(path: Path) -> dict:
    table = read_output(str(path))
    return {r[C.ID]: (r["caption"], r["summary"], r["german"], r[C.ERROR_KIND]) for r in table.to_pylist()}


def test_batch_invariance_end_to_end(ray_cluster, tiny_checkpoint, dataset, tmp_path):
    rows, _ = dataset
    write_inputs(rows, str(tmp_path / "in"))
    text = job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(tmp_path / "unused"))
    outputs = {}
    for name, overrides in {
        "call1": ["resources.rows_per_call=1"],
        "call7": ["resources.rows_per_call=7"],
        "call256": ["resources.rows_per_call=256"],
        "actors2": ["resources.rows_per_call=7", "resources.gpu_actors=2"],
    }.items():
        out = tmp_path / name
        report = run_job(load_job(text, [*overrides, f"output.path={out}"]))
        assert report["rows_out"] == len(rows)
        outputs[name] = _texts(out)
    reference = outputs["call1"]
    assert sum(1 for v in reference.values() if v[1]) > 10
    for name, texts in outputs.items():
        assert texts == reference, name


# ---- jobs that must fail before any inference --------------------------------------------------


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the run gets as far as starting or joining Ray."""

    def refuse(address=None):
        raise AssertionError("validation should have failed before Ray was touched")

    monkeypatch.setattr(run_module, "_connect", refuse)


@pytest.fixture
def small_input(tmp_path, dataset):
    rows, _ = dataset
    write_inputs(rows[:6], str(tmp_path / "in"), files=1)
    return f"{tmp_path}/in/*.parquet"


def test_missing_column_fails_before_inference(no_ray, tiny_checkpoint, small_input, tmp_path):
    text = job_toml(str(tiny_checkpoint), small_input, str(tmp_path / "out"))
    with pytest.raises(JobError, match=r"input.text_column 'body' is not a column of .*set input.text_column"):
        run_job(load_job(text, ["input.text_column=body"]))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("part-*"))


@pytest.mark.parametrize("where", ["under-a-file", "missing-bucket"])
def test_unwritable_output_fails_before_inference(no_ray, tiny_checkpoint, small_input, tmp_path, where, s3):
    endpoint, _, _ = s3
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = str(blocker / "out") if where == "under-a-file" else "s3://no-such-bucket/out"
    text = job_toml(str(tiny_checkpoint), small_input, out, storage=f'[storage.s3]\nendpoint_url = "{endpoint}"')
    with pytest.raises(JobError, match=r"output.path .* is not writable .*choose a path you can write to"):
        run_job(load_job(text))


def test_unreadable_model_fails_before_inference(no_ray, tiny_checkpoint, small_input, tmp_path):
    broken = tmp_path / "broken-ckpt"
    broken.mkdir()
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (broken / name).write_bytes((Path(tiny_checkpoint) / name).read_bytes())
    text = job_toml(str(broken), small_input, str(tmp_path / "out"))
    with pytest.raises(JobError, match=r"model.source .* no tokenizer.model"):
        run_job(load_job(text))
    with pytest.raises(JobError, match=r"model.source .* not found"):
        run_job(load_job(job_toml(str(tmp_path / "nowhere"), small_input, str(tmp_path / "out"))))


def test_other_settings_in_same_output_are_refused(ray_cluster, tiny_checkpoint, small_input, tmp_path):
    out = tmp_path / "out"
    text = job_toml(str(tiny_checkpoint), small_input, str(out), max_new_tokens=3)
    assert run_job(load_job(text))["rows_out"] == 6
    with pytest.raises(JobError, match=r"different settings \(changed: tasks\).*new output.path"):
        run_job(load_job(text, ["task.max_new_tokens=4"]))
    # Resources do not change results, so they may change between a run and its resume.
    assert run_job(load_job(text, ["resources.rows_per_call=2"]))["rows_out"] == 0


def test_pool_larger_than_a_local_ray_fails_before_inference(ray_cluster, tiny_checkpoint, small_input, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr(run_module, "_connect", lambda address=None: True)  # as if this run started Ray itself
    text = job_toml(str(tiny_checkpoint), small_input, str(tmp_path / "out"))
    with pytest.raises(JobError, match=r"needs 3 GPUs .* but the cluster has 2; .*gpus_per_actor = 0 to run on CPU"):
        run_job(load_job(text, ["resources.gpus_per_actor=1", "resources.gpu_actors=3"]))
    with pytest.raises(JobError, match=r"needs 9 CPUs \(4 actor\(s\) x 2 \+ 1 for the CPU stages\)"):
        run_job(load_job(text, ["resources.gpu_actors=4", "resources.cpus_per_actor=2"]))
    assert not list((tmp_path / "out").glob("part-*"))


def test_a_dying_model_actor_still_gives_exactly_one_row_per_input(ray_cluster, tiny_checkpoint, dataset, tmp_path):
    rows, expected = dataset
    write_inputs(rows, str(tmp_path / "in"))
    fault = Path(os.environ["T5G2_FAULT_ACTOR_EXIT_FILE"])
    fault.write_text("armed")  # the first actor call that finds it dies; Ray restarts and retries
    out = tmp_path / "out"
    report = run_job(load_job(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out))), hooks=FAULTY)
    assert not fault.exists()  # it fired
    assert report["rows_out"] == len(rows) and report["complete"]
    check_output(read_output(str(out)), rows, expected)


def test_several_outputs_per_row(ray_cluster, tiny_checkpoint, dataset, tmp_path):
    """num_return_sequences: n samples or the n best beams per row, as list columns (error rows null), each
    sample the text of its own tokens; the report counts every sequence's tokens."""
    rows, expected = dataset
    write_inputs(rows, str(tmp_path / "in"))
    tasks = """
[[task]]
kind = "summarize"
max_new_tokens = 5
temperature = 1.5
seed = 3
num_return_sequences = 3

[[task]]
kind = "translate"
output_column = "german"
source_language = "English"
target_language = "German"
max_new_tokens = 4
num_beams = 3
num_return_sequences = 2
"""
    out = tmp_path / "out"
    report = run_job(load_job(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out), tasks=tasks)))
    table = read_output(str(out))
    assert table.num_rows == len(rows)
    assert table.schema.field("summary").type.value_type == pa.string()
    assert table.schema.field("german_output_tokens").type.value_type == pa.int32()
    produced = 0
    for row in table.to_pylist():
        bad = expected.get(row[C.ID], {}).get("text")
        for column, n in (("summary", 3), ("german", 2)):
            if bad:
                assert row[column] is None and row[f"{column}_error_kind"] == bad
                continue
            assert len(row[column]) == len(row[f"{column}_output_tokens"]) == len(row[f"{column}_finish_reason"]) == n
            assert all(isinstance(text, str) for text in row[column])
            assert set(row[f"{column}_finish_reason"]) <= {"eos", "length"}
            produced += sum(row[f"{column}_output_tokens"])
    assert report["output_tokens"] == produced > 0
    samples = [tuple(row["summary"]) for row in table.to_pylist() if row["summary"]]
    assert any(len(set(s)) > 1 for s in samples), "the samples of every row are all the same"
