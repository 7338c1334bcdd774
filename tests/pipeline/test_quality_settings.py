"""A translate task's target_language becomes the wrong_language check of its finish stage; one the
language detector does not know is warned about at validation and not checked (the job runs)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import build
from pipeline.spec import load_job
from pipeline.validate import validate


def test_target_languages_become_checks_and_an_unknown_one_warns(tiny_checkpoint, tmp_path, caplog):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["Hello there."]}), tmp_path / "in" / "a.parquet")
    translate = '[[task]]\nkind = "translate"\noutput_column = "{}"\nsource_language = "English"\n' \
                'target_language = "{}"\n'
    text = f"""
[model]
source = "{tiny_checkpoint}"
[input]
path = "{tmp_path}/in/*.parquet"
id_column = "id"
text_column = "text"
[output]
path = "{tmp_path}/out"
[[task]]
kind = "summarize"
{translate.format("german", "Deutsch")}
{translate.format("klingon", "Klingon")}
"""
    caplog.set_level(logging.WARNING, logger="pipeline")
    spec = validate(load_job(text)).spec
    assert [t.language for t in build.finish_tasks(spec.tasks)] == [None, "de", None]
    warned = [r.getMessage() for r in caplog.records if "wrong_language" in r.getMessage()]
    assert warned == ["task 'klingon': target_language 'Klingon' is not a language the language detector knows; "
                      "its outputs get no wrong_language check"]
