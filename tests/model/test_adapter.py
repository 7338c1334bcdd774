"""LoRA adapters (model/adapter.py) against peft's own merge.

A small random transformers T5Gemma2 gets a LoRA with peft (random, non-zero A and B on several
projections of the encoder, the decoder and, since peft matches q_proj / v_proj by name, the
vision tower), saved with peft's save_pretrained; the base checkpoint is saved with transformers'
save_pretrained. Ours loads base + adapter and must give the logits of peft's merge_and_unload()
model, at the parity tests' tolerance. What cannot be merged is refused with the setting named.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import model
from helpers.checkpoints import SHAPES, add_tokenizer, build_reference, save_checkpoint
from model import AdapterError
from tests.model.test_parity import assert_close, decoder_batch, image_batch, text_batch

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def make_adapter(directory, shape: str, seed: int, **lora):
    """(base checkpoint dir, adapter dir, peft's merged reference): random LoRA weights, saved by peft."""
    from peft import LoraConfig, get_peft_model

    base = save_checkpoint(build_reference(SHAPES[shape], seed=seed), directory / "base")
    peft_model = get_peft_model(build_reference(SHAPES[shape], seed=seed), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # B starts at zero in peft: random both, so the merge changes every target
                p.copy_(torch.randn(p.shape, generator=gen) * (0.4 / p.shape[-1] ** 0.5))
    peft_model.save_pretrained(directory / "adapter")
    return base, directory / "adapter", peft_model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("plain"), "A", seed=31, r=4, lora_alpha=12, target_modules=TARGETS)


@pytest.fixture(scope="module")
def rslora(tmp_path_factory):
    # Multi-query attention (shape C), rsLoRA scaling, and a per-module rank (rank_pattern).
    return make_adapter(tmp_path_factory.mktemp("rslora"), "C", seed=32, r=8, lora_alpha=4, use_rslora=True,
                        rank_pattern={"down_proj": 2, "k_proj": 3},
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "fc1"])


def logits(m, ref=False):
    ids, mask = text_batch([15, 6, 10])
    dec = decoder_batch(3, 8)
    img_ids, img_mask, pixels = image_batch([7, 3], [1, 2])
    img_dec = decoder_batch(2, 5)
    with torch.no_grad():
        if ref:
            return (m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                    m(input_ids=img_ids, attention_mask=img_mask, decoder_input_ids=img_dec,
                      pixel_values=pixels).logits)
        return m(ids, mask, dec), m(img_ids, img_mask, img_dec, pixel_values=pixels)


@pytest.mark.parametrize("which", ["plain", "rslora"])
def test_merged_logits_equal_peft_merge_and_unload(which, request):
    base, adapter, merged = request.getfixturevalue(which)
    ours = model.load_pretrained(base, adapter=adapter)
    text, images = logits(ours)
    ref_text, ref_images = logits(merged, ref=True)
    assert_close(text, ref_text)
    assert_close(images, ref_images)  # the vision tower's q_proj / v_proj (fc1) got their LoRA too
    # The adapter matters: the base alone is far from the merged model.
    base_text, _ = logits(model.load_pretrained(base))
    assert (base_text - ref_text).abs().max() > 100 * 1e-5 * ref_text.abs().max()


def test_what_the_adapter_changes_is_described(plain, rslora):
    ours = model.load_pretrained(plain[0], adapter=plain[1])
    a = ours.adapter
    assert (a.rank, a.ranks, a.alpha, a.use_rslora) == (4, (4,), 12.0, False) and a.scale(4) == 3.0
    assert a.targets == ("down_proj", "gate_proj", "o_proj", "q_proj", "v_proj")
    layers = SHAPES["A"]["num_hidden_layers"]
    # 5 text projections per layer on both sides, q/v in each of the 2 vision layers
    assert len(a.modules) == 2 * 5 * layers + 2 * 2
    assert {"encoder.layers.0.self_attn.q_proj.weight", "vision_tower.layers.1.v_proj.weight"} <= set(a.modules)
    r = model.load_pretrained(rslora[0], adapter=rslora[1]).adapter
    assert r.ranks == (2, 3, 8) and r.use_rslora and r.scale(8) == pytest.approx(4 / 8 ** 0.5)
    assert "rsLoRA rank 2/3/8, alpha 4" in r.describe()


def test_merge_into_bfloat16_weights(plain):
    ours = model.load_pretrained(plain[0], adapter=plain[1], dtype="bfloat16")
    fp32 = model.load_pretrained(plain[0], adapter=plain[1])
    q = "encoder.layers.1.self_attn.qkv_proj.weight"
    # Merged in float32, then rounded once: equal to rounding the float32 merge.
    assert torch.equal(ours.state_dict()[q], fp32.state_dict()[q].to(torch.bfloat16))


def test_inspect_checkpoint_checks_and_describes_the_adapter(plain, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(plain[0], base)
    add_tokenizer(base)
    summary = model.inspect_checkpoint(str(base), adapter=str(plain[1]))
    assert summary.adapter.rank == 4 and summary.adapter.targets == tuple(sorted(TARGETS))


def edited(adapter, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    raw = json.loads((copy / "adapter_config.json").read_text())
    edit(raw)
    (copy / "adapter_config.json").write_text(json.dumps(raw))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(use_dora=True), r"use_dora is True, which is not supported: DoRA"),
    (lambda c: c.update(peft_type="LOHA"), r"peft_type is 'LOHA'; only LoRA adapters"),
    (lambda c: c.update(bias="all"), r"bias is 'all'.*trained biases"),
    (lambda c: c.update(modules_to_save=["lm_head"]), r"modules_to_save"),
    (lambda c: c.update(alpha_pattern={"q_proj": 3}), r"alpha_pattern"),
    (lambda c: c.update(r=0), r"r must be a positive integer"),
    (lambda c: c.update(lora_alpha="8"), r"lora_alpha must be a number"),
])
def test_unsupported_settings_are_refused(plain, tmp_path, edit, message):
    with pytest.raises(AdapterError, match=message):
        model.load_pretrained(plain[0], adapter=edited(plain[1], tmp_path, edit))


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_files_are_named(plain, tmp_path, missing):
    copy = tmp_path / "adapter"
    shutil.copytree(plain[1], copy)
    (copy / missing).unlink()
    with pytest.raises(AdapterError, match=rf"has no {missing}"):
        model.load_pretrained(plain[0], adapter=copy)


@pytest.mark.parametrize("targets, message", [
    (["embed_tokens"], r"not LoRA A/B weights of a projection: .*embed_tokens\.lora_embedding_A"),
    (["lm_head.out_proj"], r"lm_head\.out_proj \(not a supported projection"),
    (["patch_embedding"], r"patch_embedding \(not a supported projection"),
])
def test_unsupported_targets_are_refused(tmp_path, targets, message):
    base, adapter, _ = make_adapter(tmp_path, "A", seed=33, r=2, lora_alpha=2, target_modules=targets)
    with pytest.raises(AdapterError, match=message):
        model.load_pretrained(base, adapter=adapter)


def test_an_adapter_of_another_model_does_not_fit(plain, rslora):
    with pytest.raises(AdapterError, match=r"does not fit this model: .*lora_A .* do not fit its weight"):
        model.load_pretrained(plain[0], adapter=rslora[1])
