"""Job files: parsing, defaults, --set overrides, and errors that name the field and the fix."""

from __future__ import annotations

import pytest

from pipeline.spec import S3_CONFIG_DEFAULTS, JobError, load_job
from pipeline.tasks import TASK_KINDS

BASE = """
[model]
source = "/models/tiny"

[input]
path = "data/*.parquet"
text_column = "text"

[output]
path = "out/"

[[task]]
kind = "summarize"
"""


def job(extra: str = "", base: str = BASE) -> str:
    return base + extra


def test_defaults():
    spec = load_job(job())
    assert spec.model.dtype == "bfloat16"
    assert spec.input.paths == ("data/*.parquet",) and spec.input.id_column is None
    assert spec.input.long_input == "error" and spec.input.max_input_tokens == 8192
    assert spec.output.path == "out" and spec.output.rows_per_file == 10_000
    (task,) = spec.tasks
    assert task.output_column == "summary" and task.prompt == TASK_KINDS["summarize"].template
    assert task.generation.max_new_tokens == 128 and task.uses_text and not task.uses_image
    r = spec.resources
    assert (r.min_actors, r.max_actors, r.gpus_per_actor, r.rows_per_call) == (1, 1, 1.0, 256)


def test_several_tasks_and_their_own_defaults():
    spec = load_job(job("""
[[task]]
kind = "translate"
output_column = "fr"
target_language = "French"
source_language = "English"
num_beams = 2

[[task]]
kind = "caption"
prompt = "{image} What is in the picture?"
""").replace('text_column = "text"', 'text_column = "text"\nimage_column = "img"'))
    summarize, translate, caption = spec.tasks
    assert translate.output_column == "fr"
    assert (translate.generation.max_new_tokens, translate.generation.num_beams) == (256, 2)
    assert caption.output_column == "caption" and caption.uses_image and not caption.uses_text
    assert caption.generation.max_new_tokens == 64


def test_overrides(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(job("""
[[task]]
kind = "summarize"
output_column = "short"
"""))
    spec = load_job(path, ["resources.rows_per_call=7", "resources.gpu_actors=[1, 3]", "task.1.max_new_tokens=9",
                           "output.path=s3://bucket/out/", "storage.s3.endpoint_url=http://127.0.0.1:9000",
                           "model.dtype=float32"])
    assert spec.resources.rows_per_call == 7 and (spec.resources.min_actors, spec.resources.max_actors) == (1, 3)
    assert spec.tasks[0].generation.max_new_tokens == 128 and spec.tasks[1].generation.max_new_tokens == 9
    assert spec.output.path == "s3://bucket/out"
    assert spec.storage_options("s3://bucket/x") == {"endpoint_url": "http://127.0.0.1:9000",
                                                    "config_kwargs": S3_CONFIG_DEFAULTS}
    assert spec.storage_options("/local/x") == {} and spec.model.dtype == "float32"
    every = load_job(path, ["task.max_new_tokens=5"])
    assert [t.generation.max_new_tokens for t in every.tasks] == [5, 5]


def test_run_config_hash_follows_results_not_resources():
    a = load_job(job())
    moved = load_job(job(), ["resources.rows_per_call=3", "output.path=elsewhere"])
    assert a.run_config_hash() == moved.run_config_hash()
    assert a.run_config_hash() != load_job(job(), ["task.0.max_new_tokens=3"]).run_config_hash()
    assert a.run_config_hash() != load_job(job('prompt = "Short: {text}"\n')).run_config_hash()
    assert a.run_config_hash() != load_job(job(), ["model.dtype=float32"]).run_config_hash()


@pytest.mark.parametrize("text, overrides, message", [
    ("[model\nsource = 1", [], r"not valid TOML"),
    (job(), ["resources.rows_per_cal=3"],
     r"resources.rows_per_cal is not a known setting; did you mean 'rows_per_call'"),
    (job().replace('source = "/models/tiny"', ""), [], r"model.source is required"),
    (job(), ["model.dtype=int8"], r"model.dtype must be one of"),
    (job(), ["task.0.kind=poem"], r"task\[0\].kind must be one of 'caption', 'summarize', 'translate'"),
    (job('prompt = "Summarize {txt}"\n'), [], r"task\[0\].prompt: prompt uses \{txt\}.*may use \{text\}"),
    (job('prompt = "Summarize this."\n'), [], r"prompt lacks \{text\}"),
    (job('prompt = "Summarize {text!r}"\n'), [], r"format spec or conversion"),
    (job('\n[[task]]\nkind = "translate"\ntarget_language = "German"\n'), [],
     r"task\[1\].source_language is required"),
    (job('\n[[task]]\nkind = "caption"\n'), [],
     r"task\[1\] \(caption\) reads images, but \[input\] has no image_column"),
    (job('\n[[task]]\nkind = "summarize"\n'), [], r"collides with task\[0\]"),
    (job('output_column = "id"\n'), [], r"reserved"),
    (job(), ["task.0.max_new_tokens=0"], r"task\[0\]: max_new_tokens must be >= 1"),
    (job(), ["task.0.temperature=true"], r"task\[0\].temperature must be a number"),
    (job(), ["resources.gpu_actors=[3, 1]"], r"gpu_actors as a list must be \[min, max\]"),
    (job(), ["resources.gpus_per_actor=1.5"], r"gpus_per_actor above 1 must be a whole number"),
    (job(), ["storage.s3.secret=abc"], r"storage.s3.secret looks like a credential"),
    (job(), ["storage.s3.client_kwargs={aws_secret_access_key = 'x'}"], r"looks like a credential"),
    (job(), ["output.path=s3://me:pw@bucket/out"], r"embeds credentials"),
    (job(), ["input.long_input=drop"], r"input.long_input must be one of 'error', 'truncate'"),
    (job(), ["input.id_column=text"], r"names the same column twice"),
    (job(), ["task.0.source_language=German"], r"applies to translate tasks only"),
    (job(), ["nonsense"], r"must be key=value"),
    (job(), ["task.5.max_new_tokens=3"], r"only 1 task"),
    (job().replace("[[task]]\nkind = \"summarize\"", ""), [], r"no \[\[task\]\]"),
])
def test_errors_name_the_field_and_fix(text, overrides, message):
    with pytest.raises(JobError, match=message):
        load_job(text, overrides)


def test_missing_file():
    with pytest.raises(JobError, match=r"job file 'nope.toml' not found"):
        load_job("nope.toml")


def test_call_timeout_defaults_to_half_an_hour_and_leaves_the_run_config_alone():
    spec = load_job(job())
    assert spec.resources.call_timeout_s == 1800.0
    tuned = load_job(job(), ["resources.call_timeout_s=90"])
    assert tuned.resources.call_timeout_s == 90.0 and isinstance(tuned.resources.call_timeout_s, float)
    assert load_job(job(), ["resources.call_timeout_s=0.5"]).resources.call_timeout_s == 0.5
    # A resource, not a result: changing it between a run and its resume is allowed.
    assert tuned.run_config() == spec.run_config() and tuned.run_config_hash() == spec.run_config_hash()


@pytest.mark.parametrize("value", ["0", "-5", "true", "'600'", "inf", "nan"])
def test_call_timeout_must_be_positive_seconds(value):
    with pytest.raises(JobError, match=r"resources.call_timeout_s must be a number of seconds > 0, got .*raise it if "
                                       r"a call of rows_per_call rows really takes longer"):
        load_job(job(), [f"resources.call_timeout_s={value}"])
