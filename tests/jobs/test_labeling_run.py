"""A classify job and a generate job end to end: `t5g2 run` as a process, on the real S3 server (moto),
joining the session's Ray, over Parquet shards where bad rows sit among good ones.

Each job must give rows in == rows out, each bad row its error kind in the task it breaks (and only
there), the keep columns copied into every row (error rows too), and, for classify, a label out of
the row's candidates with probabilities that sum to one.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from helpers.pipeline_data import IMAGE_STRUCT, TEXTS, image_bytes
from operators import columns as C

REPO = Path(__file__).resolve().parents[2]
TOPICS = ["sports", "politics", "science"]

# The bad rows: what is wrong with each, and the error kind each task that reads it must report.
BAD = {
    "b-text-null": ({"text": None}, {"topic": "text_missing"}),
    "b-text-empty": ({"text": b""}, {"topic": "text_empty"}),
    "b-image-null": ({"image": None}, {"seen": "image_missing", "answer": "image_missing"}),
    "b-image-bad": ({"image": {"bytes": b"not an image at all", "path": "x.png"}},
                    {"seen": "image_decode", "answer": "image_decode"}),
    "b-cands-null": ({"cands": None}, {"seen": "labels_missing"}),
    "b-cands-empty": ({"cands": []}, {"seen": "labels_empty"}),
    "b-cands-repeat": ({"cands": ["red", "red"]}, {"seen": "labels_invalid"}),
    "b-title-null": ({"title": None}, {"answer": "field_missing"}),
    "b-prompt-null": ({"prompt": None}, {"free": "prompt_missing"}),
    "b-prompt-empty": ({"prompt": "  "}, {"free": "prompt_empty"}),
}
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.binary()), ("image", IMAGE_STRUCT), ("title", pa.string()),
                    ("question", pa.string()), ("cands", pa.list_(pa.string())), ("prompt", pa.string()),
                    ("url", pa.string())])


def labeling_rows() -> tuple[list[dict], dict[str, dict[str, str]]]:
    """Good rows with every column, and the bad rows of BAD among them; the expected kinds by id."""
    rows = []
    for i in range(8):
        rows.append({"id": f"g{i}", "text": TEXTS[i % len(TEXTS)].encode(),
                     "image": {"bytes": image_bytes("PNG", size=(20 + i, 24), color=(30 * i, 90, 200)), "path": "p"},
                     "title": f"Title {i}", "question": "What colour is the square?",
                     "cands": [["red", "green", "blue"], ["a cat", "a dog"], ["yes", "no", "maybe"]][i % 3],
                     "prompt": f"Write a line about the number {i}.", "url": f"https://example.org/{i}"})
    expected, good = {}, list(rows)
    for n, (key, (change, kinds)) in enumerate(BAD.items()):
        row = dict(good[n % len(good)], id=key, url=f"https://example.org/{key}", **change)
        rows.insert(2 * n + 1, row)  # spread among the good rows
        expected[key] = kinds
    return rows, expected


def write_s3(fs, path: str, rows: list[dict], schema: pa.Schema = SCHEMA) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, row_group_size=4)
    fs.pipe(path, buffer.getvalue())


@pytest.fixture
def corpus(s3, tiny_checkpoint):
    """The rows over two shards on S3, plus a third shard that lacks the title column (schema drift),
    and the checkpoint on S3 too."""
    endpoint, _, fs = s3
    for bucket in ("corpus", "models", "results"):
        fs.mkdir(bucket)
    fs.put(str(tiny_checkpoint) + "/", "models/tiny/", recursive=True)
    rows, expected = labeling_rows()
    half = len(rows) // 2
    write_s3(fs, "corpus/rows/part-0.parquet", rows[:half])
    write_s3(fs, "corpus/rows/part-1.parquet", rows[half:])
    drifted = [dict(rows[0], id=f"d{i}", url=f"https://example.org/d{i}") for i in range(2)]
    no_title = pa.schema([f for f in SCHEMA if f.name != "title"])
    write_s3(fs, "corpus/rows/part-2.parquet", [{k: v for k, v in r.items() if k != "title"} for r in drifted],
             no_title)
    for row in drifted:
        expected[row["id"]] = {"answer": "column_missing"}
    return endpoint, fs, rows + drifted, expected


def job_text(endpoint: str, output: str, tasks: str) -> str:
    return f"""
[model]
source = "s3://models/tiny/"
dtype = "float32"

[input]
path = "s3://corpus/rows/*.parquet"
id_column = "id"
text_column = "text"
image_column = "image"
max_input_tokens = 256

[output]
path = "s3://results/{output}/"
rows_per_file = 5
keep_columns = ["url", "question"]

{tasks}

[resources]
gpu_actors = 1
gpus_per_actor = 0
rows_per_call = 8
max_batch_tokens = 4096

[storage.s3]
endpoint_url = "{endpoint}"
"""


CLASSIFY_TASKS = f"""
[[task]]
kind = "classify"
output_column = "topic"
labels = {TOPICS}
score = "mean"

[[task]]
kind = "classify"
output_column = "seen"
prompt = "{{image}} {{question}} Choose from: {{labels}}."
labels_column = "cands"
multi_label = true
threshold = 0.3
"""

GENERATE_TASKS = """
[[task]]
kind = "generate"
output_column = "answer"
prompt = "{image} {title}. Question: {question} Answer:"
max_new_tokens = 4

[[task]]
kind = "generate"
output_column = "free"
prompt_column = "prompt"
max_new_tokens = 4
"""


def run_cli(tmp_path: Path, text: str, ray_cluster: str) -> subprocess.CompletedProcess:
    job = tmp_path / "job.toml"
    job.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(job), "--address", ray_cluster], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=400)
    # 3: complete, with error rows (the corpus holds bad rows on purpose; see README, For schedulers)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def read_results(fs, output: str) -> dict[str, dict]:
    fs.invalidate_cache()
    table = pads.dataset(f"results/{output}", format="parquet", filesystem=fs).to_table()
    return {row[C.ID]: row for row in table.to_pylist()}, table


def check_rows(out: dict, rows: list[dict], expected: dict, tasks: tuple[str, ...]) -> None:
    """rows in == rows out; each bad row its kind in the tasks it breaks; keep columns on every row."""
    assert sorted(out) == sorted(r["id"] for r in rows)
    for row in rows:
        got = out[row["id"]]
        assert got["url"] == row["url"] and got["question"] == row["question"]  # error rows too
        want = {t: k for t, k in expected.get(row["id"], {}).items() if t in tasks}
        for task in tasks:
            assert got[f"{task}_error_kind"] == want.get(task), (row["id"], task, got[f"{task}_error_message"])
            assert (got[task] is None) == (task in want), (row["id"], task)
        assert got[C.ERROR_KIND] == (next(iter(want.values())) if want else None), row["id"]


def test_a_classify_job_through_t5g2_run_on_s3(ray_cluster, corpus, tmp_path):
    endpoint, fs, rows, expected = corpus
    proc = run_cli(tmp_path, job_text(endpoint, "classify", CLASSIFY_TASKS), ray_cluster)
    assert f"rows in {len(rows)}, written now {len(rows)}" in proc.stdout
    out, table = read_results(fs, "classify")
    check_rows(out, rows, expected, ("topic", "seen"))
    assert table.schema.field("topic").type == pa.string() and table.schema.field("seen").type == pa.list_(pa.string())
    assert table.schema.field("topic_scores").type == C.SCORES_TYPE
    assert "topic_finish_reason" not in table.schema.names and table.schema.names[1:3] == ["url", "question"]
    by_id = {r["id"]: r for r in rows}
    for row_id, got in out.items():
        if got["topic_error_kind"] is None:
            entries = got["topic_scores"]
            assert [e["label"] for e in entries] == TOPICS and got["topic"] in TOPICS
            assert math.isclose(sum(e["probability"] for e in entries), 1.0, rel_tol=1e-9)
            assert all(e["score"] < 0 for e in entries)  # log-likelihoods (mean per token)
        if got["seen_error_kind"] is None:
            cands = by_id[row_id]["cands"]
            assert [e["label"] for e in got["seen_scores"]] == cands
            assert set(got["seen"]) <= set(cands)
            assert all(e["probability"] >= 0.3 for e in got["seen_scores"] if e["label"] in got["seen"])


def test_a_generate_job_through_t5g2_run_on_s3(ray_cluster, corpus, tmp_path):
    endpoint, fs, rows, expected = corpus
    proc = run_cli(tmp_path, job_text(endpoint, "generate", GENERATE_TASKS), ray_cluster)
    assert f"rows in {len(rows)}, written now {len(rows)}" in proc.stdout
    assert "task[0].prompt field 'title': 1 of 3 input files cannot provide it" in proc.stderr  # drift warned about
    out, _ = read_results(fs, "generate")
    check_rows(out, rows, expected, ("answer", "free"))
    for got in out.values():
        for task in ("answer", "free"):
            if got[f"{task}_error_kind"] is None:
                assert got[f"{task}_output_tokens"] >= 1 and got[f"{task}_finish_reason"] in ("eos", "length")
    # The image is in the answer prompt: its input tokens count the image's 4 tokens (plus markers).
    good = out["g0"]
    assert good["answer_input_tokens"] > good["free_input_tokens"] > 0
