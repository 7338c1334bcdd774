"""model.inspect_checkpoint: what a checkpoint is, read from its files without loading the weights."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from safetensors import safe_open

from model import CheckpointError, inspect_checkpoint


def test_summary_of_a_real_checkpoint(tiny_checkpoint):
    summary = inspect_checkpoint(str(tiny_checkpoint), needs_images=True)
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert summary.parameters == stored > 0
    assert summary.weight_files == ("model.safetensors",) and summary.weight_dtypes == ("F32",)
    assert summary.weight_bytes == (tiny_checkpoint / "model.safetensors").stat().st_size
    assert summary.image_tokens and summary.has_preprocessor and summary.image_size == summary.config.vision.image_size
    assert summary.tokenizer_vocab_size <= summary.config.vocab_size


def test_without_a_preprocessor_file_images_take_the_towers_size(tiny_checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "preprocessor_config.json").unlink()
    summary = inspect_checkpoint(str(copy), needs_images=True)
    assert not summary.has_preprocessor and summary.image_size == summary.config.vision.image_size == 32


def test_a_preprocessor_for_another_tower_is_refused_for_image_jobs(tiny_checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    raw = json.loads((copy / "preprocessor_config.json").read_text())
    raw["size"] = {"height": 64, "width": 64}
    (copy / "preprocessor_config.json").write_text(json.dumps(raw))
    assert inspect_checkpoint(str(copy)).image_size == 64  # a text job does not care
    with pytest.raises(CheckpointError, match="resizes images to 64x64 but the vision tower takes 32x32"):
        inspect_checkpoint(str(copy), needs_images=True)
