"""The demo: its dataset and checkpoint are real and readable, and `t5g2 demo` runs end to end.

The generation tests read what `jobs.demo.generate` wrote with the same readers the pipeline and
model use (pyarrow, model.images, model.load_pretrained, model.Tokenizer). The end-to-end test
runs `jobs.demo.main` on a small dataset with a local Ray and checks the contract the demo is
there to show: one output row per input row, and the bad rows are error rows.
"""

from __future__ import annotations

import io
import json
import random
import re
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import model
from jobs import demo
from model.images import ImageError, ImageProcessor
from model.tokenizer import Tokenizer
from pipeline.spec import load_job

ROWS = 40  # the smallest dataset that still has every language, format and bad row


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = demo.generate(out, rows=ROWS)
    return out, manifest


def _rows(directory: Path) -> list[dict]:
    return pq.read_table(directory).to_pylist()


# Characters each non-Latin script must contribute, so the tokenizer and the pipeline really see them.
SCRIPT_RANGES = {
    "ru": "\u0400-\u04ff", "el": "\u0370-\u03ff", "ar": "\u0600-\u06ff", "hi": "\u0900-\u097f",
    "zh": "\u4e00-\u9fff", "ja": "\u3040-\u309f\u30a0-\u30ff", "ko": "\uac00-\ud7af",
}


def test_documents_are_sharded_multilingual_and_include_bad_rows(generated):
    out, manifest = generated
    shards = sorted((out / "data" / "docs").glob("*.parquet"))
    assert len(shards) == demo.DOC_SHARDS
    rows = _rows(out / "data" / "docs")
    assert len(rows) == ROWS == manifest["datasets"]["docs"]
    assert len({r["id"] for r in rows}) == ROWS
    assert {r["language"] for r in rows} == set(demo.LANGUAGES)
    for row in rows:
        if row["text"] and row["language"] in SCRIPT_RANGES:
            assert re.search(f"[{SCRIPT_RANGES[row['language']]}]", row["text"]), row
    bad = [r for r in rows if not r["text"]]
    assert sorted(r["text"] for r in bad if r["text"] is not None) == [""]
    assert sum(r["text"] is None for r in bad) == 1
    assert {r["id"]: "text_missing" if r["text"] is None else "text_empty" for r in bad} == manifest["bad_rows"]["docs"]
    # Bad rows sit inside the data, not at either end.
    ids = [r["id"] for r in rows]
    assert all(0 < ids.index(b["id"]) < ROWS - 1 for b in bad)

    sentences = _rows(out / "data" / "sentences")
    assert len(sentences) == demo.sentence_count(ROWS) == manifest["datasets"]["sentences"]
    assert [s["id"] for s in sentences if not s["text"]] == ["sent-bad-empty"]


def test_images_are_hf_image_structs_in_several_formats_with_bad_rows(generated):
    out, manifest = generated
    table = pq.read_table(out / "data" / "images")
    assert table.schema.field("image").type == demo.IMAGE_STRUCT
    # `datasets` reads the column back as an Image feature thanks to this metadata.
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert len(list((out / "data" / "images").glob("*.parquet"))) == demo.IMAGE_SHARDS
    rows = table.to_pylist()
    assert len(rows) == demo.image_count(ROWS) == manifest["datasets"]["images"]

    processor = ImageProcessor.from_pretrained(out / "checkpoint")
    formats, orientations = set(), set()
    for row in rows:
        if row["id"].startswith("img-bad-"):
            continue
        data = row["image"]["bytes"]
        with Image.open(io.BytesIO(data)) as image:
            formats.add(image.format)
            orientations.add(image.getexif().get(demo.EXIF_ORIENTATION_TAG))
        assert processor.preprocess(data).shape == (3, 64, 64)
    assert formats == {"PNG", "JPEG", "WEBP"}
    assert orientations - {None}, "no image carries an EXIF orientation"

    bad = {row["id"]: row for row in rows if row["id"].startswith("img-bad-")}
    assert set(bad) == set(manifest["bad_rows"]["images"]) == set(demo.BAD_IMAGE_ERRORS)
    assert bad["img-bad-null"]["image"] is None
    for name in ("img-bad-truncated", "img-bad-not-an-image"):
        with pytest.raises(ImageError) as caught:
            processor.preprocess(bad[name]["image"]["bytes"])
        assert caught.value.kind == "image_decode"


def test_exif_orientation_restores_the_drawn_picture():
    """A stored-rotated JPEG shows the intended picture once its EXIF orientation is applied."""
    picture = Image.new("RGB", (60, 20), (255, 255, 255))
    picture.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left edge
    processor = ImageProcessor()
    for orientation in (3, 6, 8):
        stored = demo._store_unrotated(picture, orientation)
        data, _ = demo._encode(stored, "JPEG", random.Random(0), orientation)
        shown = processor.decode(data)
        assert shown.size == (60, 20), orientation
        red, _, blue = shown.getpixel((2, 10))
        assert red > 200 and blue < 80, (orientation, shown.getpixel((2, 10)))


def test_checkpoint_loads_with_our_model_and_tokenizer(generated):
    out, _ = generated
    checkpoint = out / "checkpoint"
    assert {p.name for p in checkpoint.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.model", "preprocessor_config.json"}
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["T5Gemma2ForConditionalGeneration"]

    tokenizer = Tokenizer.from_pretrained(checkpoint)
    net = model.load_pretrained(checkpoint)
    cfg = net.config
    assert (cfg.pad_token_id, cfg.eos_token_ids, cfg.bos_token_id) == (0, (1,), 2)
    assert tokenizer.vocab_size == cfg.vocab_size
    assert cfg.vision.image_size == ImageProcessor.from_pretrained(checkpoint).size[0] == 64
    assert "full_attention" in cfg.encoder.layer_types and "sliding_attention" in cfg.encoder.layer_types

    # Every script of the corpus round-trips through the trained tokenizer.
    docs = [r["text"] for r in _rows(out / "data" / "docs") if r["text"]]
    for text in docs:
        assert tokenizer.decode_one(tokenizer.encode_one(text)) == text

    # One image prompt through the whole model: the image markers are single ids of the config.
    ids = tokenizer.encode_prompt("Caption this image. <start_of_image>", num_images=1)
    assert ids.count(cfg.image_token_id) == cfg.mm_tokens_per_image
    assert cfg.boi_token_id in ids and cfg.eoi_token_id in ids
    pixels = ImageProcessor.from_pretrained(checkpoint).preprocess(
        _rows(out / "data" / "images")[0]["image"]["bytes"])[None]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = net(input_ids, torch.ones_like(input_ids), torch.tensor([[cfg.bos_token_id]]), pixel_values=pixels)
    assert logits.shape == (1, 1, cfg.vocab_size) and torch.isfinite(logits).all()


def test_generation_is_deterministic(tmp_path):
    assert demo.make_documents(30) == demo.make_documents(30)
    assert demo.make_images(9) == demo.make_images(9)
    texts = [d["text"] for d in demo.make_documents(30) if d["text"]]
    first = demo.train_tokenizer(tmp_path / "a", texts).read_bytes()
    assert demo.train_tokenizer(tmp_path / "b", texts).read_bytes() == first


def test_job_files_hold_absolute_paths_and_cpu_resources(tmp_path):
    paths = demo.write_job_files(tmp_path, max_new_tokens=5)
    assert set(paths) == {job.name for job in demo.DEMO_JOBS}
    kinds = {job.name: job.task["kind"] for job in demo.DEMO_JOBS}
    assert sorted(kinds.values()) == ["caption", "classify", "classify", "summarize", "translate"]
    for name, path in paths.items():
        job = tomllib.loads(path.read_text())
        assert Path(job["model"]["source"]).is_absolute()
        assert Path(job["input"]["path"]).is_absolute() and job["input"]["path"].endswith("*.parquet")
        assert job["output"]["path"].startswith(str(tmp_path.resolve()))
        assert job["resources"]["gpus_per_actor"] == 0
        assert job["task"][0]["kind"] == kinds[name]
        if kinds[name] == "classify":  # scores its labels, generates nothing
            assert "max_new_tokens" not in job["task"][0] and job["task"][0]["labels"]
            assert job["output"]["keep_columns"]
        else:
            assert job["task"][0]["max_new_tokens"] == 5


def test_job_files_parse_as_job_specs(tmp_path):
    for path in demo.write_job_files(tmp_path, max_new_tokens=5).values():
        load_job(path)


def test_keep_reuses_the_dataset_and_checkpoint(generated, capsys):
    out, manifest = generated
    tokenizer = out / "checkpoint" / "tokenizer.model"
    before = tokenizer.stat().st_mtime_ns
    assert demo.prepare(out, rows=ROWS + 5, keep=True) == manifest
    assert tokenizer.stat().st_mtime_ns == before
    assert "ignored" in capsys.readouterr().out


def test_keep_generates_when_nothing_is_there(tmp_path):
    manifest = demo.prepare(tmp_path, rows=20, keep=True)
    assert manifest["datasets"]["docs"] == 20
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        demo.parse_args(["--rows", "3"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--max-new-tokens", "0"])
    args = demo.parse_args([])
    assert (args.out, args.rows, args.keep) == (demo.DEFAULT_OUT, demo.DEFAULT_ROWS, False)


def test_demo_runs_end_to_end(tmp_path, capsys, ray_cluster):
    """`t5g2 demo` on a small dataset; the session's Ray is joined, as run_job joins a running Ray."""
    from operators import columns

    assert demo.main(["--out", str(tmp_path), "--rows", "24", "--max-new-tokens", "4"]) == 0
    manifest = json.loads((tmp_path / demo.MANIFEST).read_text())
    for job in demo.DEMO_JOBS:
        inputs = _rows(tmp_path / "data" / job.dataset)
        outputs = demo.read_output(tmp_path / "outputs" / job.name).to_pylist()
        assert len(outputs) == len(inputs), job.name
        assert sorted(r[columns.ID] for r in outputs) == sorted(r["id"] for r in inputs), job.name
        errors = {r[columns.ID]: r[columns.ERROR_KIND] for r in outputs if r[columns.ERROR_KIND]}
        assert errors == manifest["bad_rows"][job.dataset], job.name
        for row in outputs:  # a result or an error, never both
            has_result = row[job.task["output_column"]] is not None
            assert has_result != bool(row[columns.ERROR_KIND]), row
        if job.classify:  # a label of the job's, every candidate's probability, the kept columns beside
            by_id = {r["id"]: r for r in inputs}
            for row in outputs:
                assert all(row[k] == by_id[row[columns.ID]][k] for k in job.keep_columns)
                if not row[columns.ERROR_KIND]:
                    assert row[job.task["output_column"]] in job.task["labels"]
                    scores = row[f"{job.task['output_column']}_scores"]
                    assert [e["label"] for e in scores] == job.task["labels"]
                    assert abs(sum(e["probability"] for e in scores) - 1) < 1e-9
    printed = capsys.readouterr().out
    assert "img-bad-truncated" in printed and "Demo finished" in printed
    assert "classify-topics" in printed and "(kept)" in printed and "yes 0." in printed
    # Before the runs, the dry run of the first job: its rows, prompt lengths and estimate.
    dry = printed[printed.index("=== dry run"):printed.index("=== summarize")]
    assert "the job is valid" in dry and "input     24 rows in 4 file(s)" in dry
    assert "prompt length without the limit" in dry and "estimate  for 1 actor(s) x (CPU" in dry
