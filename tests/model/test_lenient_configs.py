"""Configs that transformers loads are loaded: attention soft-capping set, SigLIP's head present.

Each checkpoint is a transformers T5Gemma2ForConditionalGeneration built with the setting and
written by its own save_pretrained; ours loads it, warns, and its logits equal the reference's at
the parity tests' tolerance. Everything else stays strict: tensors we do not know are still refused.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from helpers.checkpoints import SHAPES, VISION, add_tokenizer, build_reference, save_checkpoint
from tests.model.test_parity import assert_close, decoder_batch, image_batch, text_batch

HEAD = dict(VISION, vision_use_head=True)


@pytest.fixture(scope="module")
def softcapped(tmp_path_factory):
    # A small cap, so that applying it would change every attention score the random weights make.
    ref = build_reference(dict(SHAPES["A"], attn_logit_softcapping=0.5), seed=11)
    return ref, save_checkpoint(ref, tmp_path_factory.mktemp("softcap"))


@pytest.fixture(scope="module")
def with_head(tmp_path_factory):
    ref = build_reference(SHAPES["C"], seed=12, vision=HEAD)
    return ref, save_checkpoint(ref, tmp_path_factory.mktemp("head"))


def head_keys(directory) -> list[str]:
    return sorted(k for k in load_file(str(directory / "model.safetensors")) if ".head." in k)


@torch.no_grad()
def test_attention_softcapping_is_ignored_as_the_reference_does(softcapped, caplog):
    ref, directory = softcapped
    raw = json.loads((directory / "config.json").read_text())
    assert raw["decoder"]["attn_logit_softcapping"] == raw["encoder"]["text_config"]["attn_logit_softcapping"] == 0.5
    with caplog.at_level(logging.WARNING, logger="model"):
        ours = model.load_pretrained(directory)
    warned = [r.getMessage() for r in caplog.records if "attn_logit_softcapping" in r.getMessage()]
    assert len(warned) == 2 and all("is 0.5: ignored" in w and "never applies it" in w for w in warned)
    assert any("decoder.attn_logit_softcapping" in w for w in warned)
    assert any("encoder.text_config.attn_logit_softcapping" in w for w in warned)
    ids, mask = text_batch([17, 9, 4])
    dec = decoder_batch(3, 7)
    assert_close(ours(ids, mask, dec), ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
    ids, mask, pixels = image_batch([6, 3], [1, 2])
    dec = decoder_batch(2, 5)
    expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, pixel_values=pixels).logits
    assert_close(ours(ids, mask, dec, pixel_values=pixels), expected)


def with_tokenizer(directory, tmp_path):
    copy = tmp_path / "with-tokenizer"
    shutil.copytree(directory, copy)
    add_tokenizer(copy)
    return copy


def test_softcapping_warning_is_in_the_summary(softcapped, tmp_path):
    summary = model.inspect_checkpoint(str(with_tokenizer(softcapped[1], tmp_path)))
    assert sum("attn_logit_softcapping is 0.5: ignored" in w for w in summary.warnings) == 2


@torch.no_grad()
def test_vision_head_tensors_are_skipped_with_a_warning(with_head, caplog):
    ref, directory = with_head
    keys = head_keys(directory)
    assert len(keys) == 11 and any(k.endswith("head.probe") for k in keys)  # transformers saved the head
    with caplog.at_level(logging.WARNING, logger="model"):
        ours = model.load_pretrained(directory)
    text = caplog.text
    assert "vision_use_head is true" in text and "skipped 11 tensor(s) of SigLIP's pooling head" in text
    assert all(k in text for k in keys)  # every skipped tensor is named
    assert ours.skipped_tensors == tuple(keys)
    ids, mask, pixels = image_batch([9, 4, 12], [1, 1, 2])
    dec = decoder_batch(3, 6)
    expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, pixel_values=pixels).logits
    assert_close(ours(ids, mask, dec, pixel_values=pixels), expected)


def test_skipped_head_tensors_are_in_the_summary(with_head, tmp_path):
    summary = model.inspect_checkpoint(str(with_tokenizer(with_head[1], tmp_path)), needs_images=True)
    assert any("vision_use_head is true" in w for w in summary.warnings)
    assert any("skipped 11 tensor(s)" in w and "head.probe" in w for w in summary.warnings)


def test_head_tensors_without_vision_use_head_are_still_refused(with_head, tmp_path):
    _, directory = with_head
    copy = tmp_path / "ckpt"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    raw = json.loads((directory / "config.json").read_text())
    raw["encoder"]["vision_config"]["vision_use_head"] = False
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(model.CheckpointError, match=r"unexpected tensors: .*vision_tower\.head\.attention"):
        model.load_pretrained(copy)


def test_unknown_tensors_beside_the_head_are_still_refused(with_head, tmp_path):
    _, directory = with_head
    copy = tmp_path / "ckpt"
    copy.mkdir()
    (copy / "config.json").write_text((directory / "config.json").read_text())
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["model.encoder.vision_tower.head.extra.weight"] = torch.ones(2)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(model.CheckpointError, match=r"unexpected tensors: model\.encoder\.vision_tower\.head\.extra\."
                                                    r"weight$"):
        model.load_pretrained(copy)


def test_vision_use_head_absent_means_true_as_in_siglip(with_head):
    raw = json.loads((with_head[1] / "config.json").read_text())
    del raw["encoder"]["vision_config"]["vision_use_head"]
    config = model.T5Gemma2Config.from_dict(raw)
    assert config.vision.has_unused_head
    assert any("SiglipVisionConfig's default: true" in w for w in config.warnings)
