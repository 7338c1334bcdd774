"""Test data for the pipeline: a tiny complete checkpoint and Parquet inputs with hostile rows.

`make_checkpoint(dir)` writes a runnable checkpoint directory: random tiny T5Gemma 2 weights in
the real Hugging Face layout (transformers' save_pretrained, shape TEXT_A, vocab 512, 32 px images,
4 tokens per image), a real SentencePiece tokenizer.model trained here (tests/helpers/spm.py), a
config.json whose special ids are those of the trained tokenizer, and a preprocessor_config.json
for 32 px. `mixed_rows()` gives rows with text and image where some rows are bad in exactly one way,
with the error kind each task must report; `write_inputs` writes them as Parquet files.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_SIZE = 32


def make_checkpoint(directory: str | os.PathLike) -> Path:
    from helpers.checkpoints import TEXT_A, build_reference, save_checkpoint
    from helpers.spm import special_token_ids, train_sentencepiece

    directory = Path(directory)
    save_checkpoint(build_reference(TEXT_A, seed=0), directory)
    ids = special_token_ids(train_sentencepiece(directory, vocab_size=512))
    assert ids["piece_count"] <= 512 and (ids["pad"], ids["eos"], ids["bos"]) == (0, 1, 2), ids
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["image_token_index"] = ids["image"]
    config["eoi_token_index"] = ids["eoi"]
    config["encoder"]["boi_token_index"] = ids["boi"]
    config["encoder"]["eoi_token_index"] = ids["eoi"]
    config["encoder"]["image_token_index"] = ids["image"]
    config_path.write_text(json.dumps(config, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
    }))
    return directory


# ---- images ------------------------------------------------------------------------------------


def image_bytes(fmt: str = "PNG", size=(40, 30), color=(200, 30, 60), mode: str = "RGB") -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new(mode, size, color if mode == "RGB" else 0)
    if mode == "RGB":
        draw = ImageDraw.Draw(image)
        draw.rectangle([2, 2, size[0] // 2, size[1] // 2], fill=(color[2], color[0], color[1]))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


_BOMB: bytes | None = None


def bomb_png() -> bytes:
    """A small PNG whose header says 12000 x 12000 pixels: over Pillow's decompression-bomb limit."""
    global _BOMB
    if _BOMB is None:
        from PIL import Image

        out = io.BytesIO()
        Image.new("1", (12000, 12000)).save(out, format="PNG")
        _BOMB = out.getvalue()
    return _BOMB


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Das Wetter ist heute schön und die Sonne scheint.",
    "A photo of a cat sitting on a red chair near the window.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, 3.14159 and 100% of 42 items.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El zorro marrón rápido salta sobre el perro perezoso.",
    "Summarize the following document: the report covers sales in 2024.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
]


def mixed_rows(good: int = 16, long_text_chars: int = 2000) -> tuple[list[dict], dict[str, dict[str, str]]]:
    """Rows {id, text (bytes or None), image ({bytes, path} or None)} and the expected error kind per
    task family ("text" tasks and "image" tasks) for each bad row's id."""
    rows, expected = [], {}
    for i in range(good):
        rows.append({"id": f"good-{i:03d}", "text": TEXTS[i % len(TEXTS)].encode() + f" #{i}".encode(),
                     "image": {"bytes": image_bytes("PNG" if i % 2 else "JPEG", size=(24 + i, 20 + 2 * i),
                                                    color=(10 * i % 255, 100, 200)), "path": f"img{i}.png"}})
    ok_image = {"bytes": image_bytes(), "path": "ok.png"}
    ok_text = b"A perfectly fine sentence."
    bad_text = {
        "text-null": (None, "text_missing"),
        "text-empty": (b"", "text_empty"),
        "text-space": (b"  \n\t ", "text_empty"),
        "text-utf8": (b"caf\xc3 \xff\xfe broken", "text_invalid_utf8"),
        "text-long": (("word " * long_text_chars).encode(), "text_too_long"),
        "text-marker": (b"look <image_soft_token> here", "prompt_images"),
    }
    for key, (text, kind) in bad_text.items():
        rows.append({"id": key, "text": text, "image": ok_image})
        expected[key] = {"text": kind}
    truncated = image_bytes("JPEG", size=(64, 64))
    bad_image = {
        "image-null": (None, "image_missing"),
        "image-nobytes": ({"bytes": None, "path": "elsewhere.png"}, "image_missing"),
        "image-zero": ({"bytes": b"", "path": "zero.png"}, "image_decode"),
        "image-truncated": ({"bytes": truncated[: len(truncated) // 2], "path": "cut.jpg"}, "image_decode"),
        "image-random": ({"bytes": os.urandom(300), "path": "noise.bin"}, "image_decode"),
        "image-bomb": ({"bytes": bomb_png(), "path": "bomb.png"}, "image_too_large"),
        "image-format": ({"bytes": image_bytes("PPM"), "path": "x.ppm"}, "image_format"),
    }
    for key, (image, kind) in bad_image.items():
        rows.append({"id": key, "text": ok_text, "image": image})
        expected[key] = {"image": kind}
    return rows, expected


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def rows_table(rows: list[dict], text_type: pa.DataType | None = None) -> pa.Table:
    text_type = text_type or pa.binary()
    return pa.table({
        "id": pa.array([r["id"] for r in rows], type=pa.string()),
        "text": pa.array([r["text"] for r in rows], type=text_type),
        "image": pa.array([r["image"] for r in rows], type=IMAGE_STRUCT),
        "unused": pa.array([b"x" * 10] * len(rows), type=pa.binary()),
    })


def write_inputs(rows: list[dict], directory: str, fs=None, files: int = 2, row_group_size: int = 5) -> list[str]:
    """Split rows over `files` Parquet files (small row groups) under `directory` (local or, with `fs`,
    a bucket path); returns the file paths."""
    paths = []
    per = -(-len(rows) // files)
    for n in range(files):
        chunk = rows[n * per:(n + 1) * per]
        if not chunk:
            continue
        table = rows_table(chunk)
        path = f"{directory.rstrip('/')}/part-{n}.parquet"
        if fs is None:
            os.makedirs(directory, exist_ok=True)
            pq.write_table(table, path, row_group_size=row_group_size)
        else:
            buffer = io.BytesIO()
            pq.write_table(table, buffer, row_group_size=row_group_size)
            fs.pipe(path, buffer.getvalue())
        paths.append(path)
    return paths


def job_toml(source: str, input_path: str, output_path: str, *, tasks: str | None = None, resources: str = "",
             extra_input: str = "", storage: str = "", rows_per_file: int = 5, max_new_tokens: int = 6) -> str:
    tasks = tasks if tasks is not None else f"""
[[task]]
kind = "caption"
max_new_tokens = {max_new_tokens}

[[task]]
kind = "summarize"
max_new_tokens = {max_new_tokens}

[[task]]
kind = "translate"
output_column = "german"
source_language = "English"
target_language = "German"
max_new_tokens = {max_new_tokens}
"""
    return f"""
[model]
source = "{source}"
dtype = "float32"

[input]
path = "{input_path}"
id_column = "id"
text_column = "text"
image_column = "image"
max_input_tokens = 256
{extra_input}

[output]
path = "{output_path}"
rows_per_file = {rows_per_file}

{tasks}

[resources]
gpu_actors = 1
gpus_per_actor = 0
rows_per_call = 8
max_batch_tokens = 4096
{resources}

{storage}
"""
