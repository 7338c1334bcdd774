"""The example job files (jobs/examples/*.toml) and the README's job are valid, realistic and documented.

Each parses with `pipeline.spec.load_job`, the same parser `t5g2 run` uses; each runs the real
released checkpoint in bfloat16 on GPU actors; and every field carries a comment, since these
files are where users start from.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import jobs
from pipeline.spec import load_job

EXAMPLES_DIR = Path(jobs.__file__).resolve().parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.toml"))
README = Path(jobs.__file__).resolve().parent.parent / "README.md"
REAL_CHECKPOINT = "google/t5gemma-2-270m-270m"


# The task kinds each example runs.
KINDS = {"caption-images.toml": {"caption"}, "classify-corpus.toml": {"classify"},
         "summarize-corpus.toml": {"summarize"}, "translate-corpus.toml": {"translate"},
         "vqa-images.toml": {"generate", "classify"}}


def test_the_examples_exist():
    assert [p.name for p in EXAMPLES] == sorted(KINDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_as_a_job(path):
    load_job(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_the_real_checkpoint_on_gpus(path):
    job = tomllib.loads(path.read_text())
    source = job["model"]["source"]
    assert source == REAL_CHECKPOINT or source.rstrip("/").endswith(REAL_CHECKPOINT.split("/")[1])
    assert job["model"]["dtype"] == "bfloat16"
    assert job["resources"]["gpus_per_actor"] > 0
    assert job["input"]["path"].startswith("s3://") and job["output"]["path"].startswith("s3://")
    kinds = {task["kind"] for task in job["task"]}
    assert kinds == KINDS[path.name]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_field_is_commented(path):
    """Each `key = value` line has a comment on the line above it or on the same line."""
    field = re.compile(r"^[A-Za-z_][\w.]*\s*=")
    previous = ""
    uncommented = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if field.match(stripped) and "#" not in stripped and not previous.startswith("#"):
            uncommented.append(f"{path.name}:{number}: {stripped}")
        if stripped:
            previous = stripped
    assert not uncommented, "fields without a comment:\n" + "\n".join(uncommented)


def test_the_labeling_examples_use_what_labeling_needs():
    """classify-corpus: fixed and per-row labels, mean scores, multi-label, keep columns, a field beyond
    {text}; vqa-images: a question column with the image, and a yes/no classify task."""
    topic, tags = load_job(EXAMPLES_DIR / "classify-corpus.toml").tasks
    assert topic.labels and topic.score == "mean" and topic.fields == ("title",) and topic.uses_text
    assert tags.labels_column == "candidate_tags" and tags.multi_label and 0 < tags.threshold < 1
    vqa = load_job(EXAMPLES_DIR / "vqa-images.toml")
    answer, person = vqa.tasks
    assert answer.kind == "generate" and answer.fields == ("question",) and answer.uses_image
    assert person.labels == ("yes", "no") and person.uses_image
    assert vqa.output.keep_columns == ("question", "image_file")


def _readme_job() -> str:
    text = README.read_text()
    section = text.split("## Using a real checkpoint", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's 'Using a real checkpoint' section shows one job file"
    return blocks[0]


def test_readme_job_uses_the_real_checkpoint():
    job = tomllib.loads(_readme_job())
    assert job["model"] == {"source": REAL_CHECKPOINT, "dtype": "bfloat16"}
    assert job["resources"]["gpus_per_actor"] == 1


def test_readme_job_parses_as_a_job(tmp_path):
    path = tmp_path / "readme-job.toml"
    path.write_text(_readme_job())
    load_job(path)
