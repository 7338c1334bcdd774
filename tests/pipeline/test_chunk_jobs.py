"""input.long_input = "chunk" as a job runs it: max_input_tokens checked against the checkpoint's context
before any work, and one end-to-end run on a local Ray where a long document is summarized in pieces
beside ordinary rows (operators/chunking.py; tests/operators/test_chunking.py has the details)."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest

from helpers.pipeline_data import job_toml, write_inputs
from operators import columns as C
from pipeline import run as run_module
from pipeline.run import run_job
from pipeline.spec import JobError, load_job

TASKS = """
[[task]]
kind = "summarize"
max_new_tokens = 6
min_new_tokens = 6

[[task]]
kind = "generate"
output_column = "keywords"
prompt = "Keywords of {text}:"
max_new_tokens = 4
"""


def long_text(paragraphs: int) -> bytes:
    return "\n\n".join(" ".join(f"Sentence {p}-{i} is about the quick brown fox." for i in range(4))
                       for p in range(paragraphs)).encode()


def rows() -> list[dict]:
    short = [{"id": f"short-{i}", "text": f"A short text, number {i}.".encode(), "image": None} for i in range(4)]
    return short + [{"id": "long", "text": long_text(4), "image": None}, {"id": "null", "text": None, "image": None}]


def test_max_input_tokens_past_the_context_fails_before_any_work(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "_connect", lambda address=None: pytest.fail("Ray was started"))
    write_inputs(rows(), str(tmp_path / "in"), files=1)
    text = job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(tmp_path / "out"), tasks=TASKS)
    with pytest.raises(JobError, match=r"input.max_input_tokens = 131073 is more than the context of model.source .* "
                                       r"\(131072 tokens, .*max_position_embeddings\); set max_input_tokens to at "
                                       r"most 131072; long_input = \"chunk\" then splits"):
        run_job(load_job(text, ["input.max_input_tokens=131073", 'input.long_input="chunk"']))


def test_a_long_document_is_summarized_in_pieces_in_a_run(ray_cluster, tiny_checkpoint, tmp_path):
    write_inputs(rows(), str(tmp_path / "in"), files=1)
    out = tmp_path / "out"
    text = job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out), tasks=TASKS, rows_per_file=3)
    report = run_job(load_job(text, ["input.max_input_tokens=96", 'input.long_input="chunk"']))
    assert report["complete"] and report["rows_out"] == 6
    table = pads.dataset(str(out), format="parquet").to_table()
    got = {row[C.ID]: row for row in table.to_pylist()}
    long = got["long"]
    for task in ("summary", "keywords"):
        assert long[f"{task}_error_kind"] is None and long[task] is not None
        assert long[f"{task}_chunks"] > 3 and long[f"{task}_chunk_depth"] >= 1
        assert long[f"{task}_input_tokens"] > 3 * 96  # every piece's prompt and every join's
        for i in range(4):
            short = got[f"short-{i}"]
            assert (short[f"{task}_chunks"], short[f"{task}_chunk_depth"]) == (1, 0)
            assert short[f"{task}_input_tokens"] <= 96
        assert got["null"][f"{task}_error_kind"] == "text_missing"
        assert got["null"][f"{task}_chunks"] is None and got["null"][f"{task}_chunk_depth"] is None
    assert long["summary_output_tokens"] == 6
    assert table.schema.field("summary_chunks").type == table.schema.field("keywords_chunk_depth").type
