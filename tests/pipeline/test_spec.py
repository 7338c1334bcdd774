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
    assert (r.min_actors, r.max_actors, r.gpus_per_actor, r.rows_per_call) == (1, 1, 1.0, 1024)  # a GPU text job


def test_rows_per_call_defaults_to_four_times_the_slots_on_gpu_text_jobs_only():
    """Unset, rows_per_call is 1024 where a GPU decodes text (refill needs rows waiting in the call), 256
    on CPU actors and where a task reads images; a job's own value always wins."""
    assert load_job(job()).resources.rows_per_call == 1024
    assert load_job(job("[resources]\ngpus_per_actor = 0.5\n")).resources.rows_per_call == 1024
    assert load_job(job("[resources]\ngpus_per_actor = 0\n")).resources.rows_per_call == 256
    assert load_job(job("[resources]\nrows_per_call = 64\n")).resources.rows_per_call == 64
    images = job(base=BASE.replace('text_column = "text"', 'text_column = "text"\nimage_column = "img"')
                 .replace('kind = "summarize"', 'kind = "caption"'))
    assert load_job(images).resources.rows_per_call == 256


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


# ---- labeling: classify, generate, keep_columns ------------------------------------------------

LABELING = BASE.replace('text_column = "text"', 'text_column = "text"\nimage_column = "img"')
CLASSIFY = '\n[[task]]\nkind = "classify"\noutput_column = "topic"\n'
GENERATE = '\n[[task]]\nkind = "generate"\noutput_column = "answer"\n'


def test_classify_and_generate_defaults_and_their_run_config():
    spec = load_job(job(CLASSIFY + 'labels = ["sports", "politics"]\n' + GENERATE + 'prompt = "{image} Q: {question}"\n'
                        '[[task]]\nkind = "generate"\nprompt_column = "prompt"\n', base=LABELING))
    summarize, topic, answer, free = spec.tasks
    assert topic.classify and topic.labels == ("sports", "politics") and topic.score == "sum"
    assert topic.generation is None and topic.uses_text and topic.fields == () and not topic.multi_label
    assert "{labels}" in topic.prompt and "{text}" in topic.prompt
    assert answer.fields == ("question",) and answer.uses_image and not answer.uses_text
    assert answer.generation.max_new_tokens == 128 and answer.input_columns() == {"question": "field"}
    assert free.output_column == "output" and free.prompt is None and free.input_columns() == {"prompt": "field"}
    assert [t.output_task.classify for t in spec.tasks] == [False, True, False, False]
    # A job without the new settings keeps the run config (and hash) it had: its outputs stay valid.
    old_keys = {"kind", "output_column", "prompt", "source_language", "target_language", "generation", "uses_text",
                "uses_image"}
    assert set(load_job(job()).run_config()["tasks"][0]) == old_keys
    assert "keep_columns" not in load_job(job()).run_config()
    config = spec.run_config()["tasks"]
    assert list(config[1]["labels"]) == ["sports", "politics"] and config[1]["score"] == "sum"
    assert list(config[2]["fields"]) == ["question"] and config[3]["prompt_column"] == "prompt"


def test_classify_settings_change_the_run_config_hash():
    base = job(CLASSIFY + 'labels = ["a", "b"]\n')
    a = load_job(base)
    assert a.run_config_hash() != load_job(base, ["task.1.score=mean"]).run_config_hash()
    assert a.run_config_hash() != load_job(base, ['task.1.labels=["a", "c"]']).run_config_hash()
    kept = load_job(base, ['output.keep_columns=["title"]'])
    assert kept.output.keep_columns == ("title",) and kept.run_config_hash() != a.run_config_hash()
    multi = load_job(base, ["task.1.multi_label=true", "task.1.threshold=0.25"]).tasks[1]
    assert multi.multi_label and multi.threshold == 0.25 and multi.output_task.multi_label


@pytest.mark.parametrize("extra, overrides, message", [
    (CLASSIFY, [], r"task\[1\] \(classify\) has no labels to choose from: set labels = .* or labels_column"),
    (CLASSIFY + 'labels = ["a"]\nlabels_column = "cands"\n', [], r"task\[1\] sets both labels and labels_column"),
    (CLASSIFY + "labels = []\n", [], r"task\[1\].labels must be a non-empty list of label strings"),
    (CLASSIFY + 'labels = "sports"\n', [], r"task\[1\].labels must be a non-empty list"),
    (CLASSIFY + 'labels = ["a", " "]\n', [], r"task\[1\].labels holds ' '; every label must be a non-empty string"),
    (CLASSIFY + 'labels = ["a", 3]\n', [], r"task\[1\].labels holds 3"),
    (CLASSIFY + 'labels = ["a", "b", "a"]\n', [], r"task\[1\].labels lists 'a' more than once"),
    (CLASSIFY + 'labels = ["a"]\nthreshold = 0.5\n', [], r"task\[1\].threshold applies with multi_label = true only"),
    (CLASSIFY + 'labels = ["a"]\nmulti_label = true\nthreshold = 1.5\n', [],
     r"task\[1\].threshold must be a probability in \[0, 1\]"),
    (CLASSIFY + 'labels = ["a"]\nmulti_label = true\nthreshold = -0.1\n', [], r"must be a probability in \[0, 1\]"),
    (CLASSIFY + 'labels = ["a"]\nmulti_label = true\n', [], r"task\[1\]: multi_label = true needs a threshold"),
    (CLASSIFY + 'labels = ["a"]\nmulti_label = "yes"\n', [], r"task\[1\].multi_label must be true or false"),
    (CLASSIFY + 'labels = ["a"]\nscore = "max"\n', [], r"task\[1\].score must be one of 'sum', 'mean', got 'max'"),
    (CLASSIFY + 'labels = ["a"]\nmax_new_tokens = 5\n', [],
     r"task\[1\].max_new_tokens is a generation setting, but a classify task generates nothing"),
    (CLASSIFY + 'labels = ["a"]\n', ["task.max_new_tokens=5"], r"use --set task.N.max_new_tokens"),
    (CLASSIFY + 'labels = ["a"]\nprompt = "Pick one of {labels}."\n', [], r"task\[1\].prompt names no input column"),
    (CLASSIFY + 'labels = ["a"]\nprompt = "{image} Is it {labels}?"\n', [],
     r"task\[1\] \(classify\) reads images, but \[input\] has no image_column"),
    ('labels = ["a"]\n', [], r"task\[0\].labels applies to classify tasks only"),
    ('threshold = 0.5\n', [], r"task\[0\].threshold applies to classify tasks only"),
    (GENERATE, [], r"task\[1\] \(generate\) needs a prompt: a template whose fields name input columns "
                   r".*prompt_column"),
    (GENERATE + 'prompt = "Tell me a joke."\n', [], r"task\[1\].prompt names no input column, so every row would get "
                                                    r"the same prompt"),
    (GENERATE + 'prompt = "{q}"\nprompt_column = "p"\n', [], r"task\[1\] sets both prompt and prompt_column"),
    (GENERATE + 'prompt = "Q: {question!r}"\n', [], r"format spec or conversion"),
    (GENERATE + 'prompt = "{0}"\n', [], r"placeholder \{0\} is not a name"),
    ('prompt_column = "p"\n', [], r"task\[0\].prompt_column applies to generate and classify tasks"),
    ('prompt = "Summarize {text} with {labels}"\n', [],
     r"prompt uses \{labels\}, which a summarize task does not fill"),
    (GENERATE + 'prompt = "{title}"\nsource_language = "German"\n', [], r"applies to translate tasks only"),
    ("", ['output.keep_columns=["id"]'], r"output.keep_columns names 'id', which clashes with the output's own"),
    ("", ['output.keep_columns=["error_message"]'], r"'error_message', which clashes with the output's own"),
    ("", ['output.keep_columns=["summary"]'], r"'summary', which clashes with task\[0\]'s output columns"),
    ("", ['output.keep_columns=["summary_finish_reason"]'], r"clashes with task\[0\]'s output columns"),
    (CLASSIFY + 'labels = ["a"]\n', ['output.keep_columns=["topic_scores"]'], r"clashes with task\[1\]'s output"),
    ("", ['output.keep_columns=["__unit"]'], r"clashes with the internal columns"),
    ("", ['output.keep_columns=["title", "title"]'], r"output.keep_columns names 'title' more than once"),
    ("", ['output.keep_columns="title"'], r"output.keep_columns must be a list of column names"),
])
def test_labeling_job_errors_name_the_field_and_fix(extra, overrides, message):
    with pytest.raises(JobError, match=message):
        load_job(job(extra), overrides)


def test_a_classify_and_a_generate_task_may_read_only_other_columns():
    """Neither text_column nor image_column is needed when the tasks read other columns."""
    spec = load_job(BASE.replace('text_column = "text"\n', "").replace('kind = "summarize"',
                    'kind = "generate"\nprompt = "Title: {title}\\nKeywords:"')
                    + CLASSIFY + 'labels_column = "choices"\nprompt = "{question} {labels}?"\n')
    generate, classify = spec.tasks
    assert generate.fields == ("title",) and not generate.uses_text
    assert classify.input_columns() == {"question": "field", "choices": "labels"}


@pytest.mark.parametrize("extra, message", [
    ('\n[[task]]\nkind = "translate"\ntarget_language = "German"\nsource_language = "English"\n',
     r"input.long_input = \"chunk\" applies to summarize and generate tasks only: .*task\[1\] \(translate\)"),
    ('\n[[task]]\nkind = "classify"\nlabels = ["a", "b"]\n',
     r"summarize and generate tasks only: .*task\[1\] \(classify\)"),
    ('\n[[task]]\nkind = "caption"\n', r"summarize and generate tasks only: .*task\[1\] \(caption\)"),
    ('\n[[task]]\nkind = "generate"\nprompt_column = "question"\n', r"task\[1\]'s prompt has no \{text\} \(it reads "
                                                                   r"prompt_column\)"),
    ('\n[[task]]\nkind = "generate"\nprompt = "{image} {text}"\n',
     r"cannot split a prompt with an \{image\} \(task\[1\]"),
    ('\n[[task]]\nkind = "generate"\nprompt = "{text}"\ntemperature = 1.0\nnum_return_sequences = 2\n',
     r"task\[1\] asks for num_return_sequences = 2"),
    ('\n[[task]]\nkind = "generate"\nprompt = "Keywords: {text}"\nmax_new_tokens = 4096\n',
     r"must hold at least two of them .*raise max_input_tokens above 8192 or lower max_new_tokens"),
])
def test_chunk_takes_generating_text_tasks_whose_outputs_can_be_joined(extra, message):
    base = BASE.replace('text_column = "text"', 'text_column = "text"\nimage_column = "img"\nlong_input = "chunk"')
    spec = load_job(job(base=base))
    assert spec.input.long_input == "chunk" and spec.run_config()["input"]["long_input"] == "chunk"
    assert load_job(job('\n[[task]]\nkind = "generate"\nprompt = "Title: {title}\\n{text}\\nKeywords:"\n', base))
    with pytest.raises(JobError, match=message):
        load_job(job(extra, base))
