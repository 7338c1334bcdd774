"""generation_config.json: its token ids decide where decoding starts and stops, as in transformers.

A random checkpoint is written by transformers' save_pretrained, then its generation_config.json is
replaced. The EOS list names a token that greedy decoding really produces a few steps in (found by
decoding once without it), so a loader that ignores the file decodes past it and the test fails.
The reference is transformers' generate() on the same directory, loaded with from_pretrained (which
reads generation_config.json), given the job's settings (greedy) explicitly: the file's sampling
settings are shown by `t5g2 inspect`, never applied.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import model
from helpers.checkpoints import SHAPES, build_reference, random_prompts, save_checkpoint
from model import GenerationParams, Generator, Request

MAX_NEW = 12
PROMPTS = random_prompts([9, 14, 5, 11, 7, 16], seed=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_checkpoint(build_reference(SHAPES["A"], seed=21), tmp_path_factory.mktemp("base"))


def with_generation_config(base, tmp_path, content: dict):
    directory = tmp_path / "ckpt"
    shutil.copytree(base, directory)
    (directory / "generation_config.json").write_text(json.dumps(content))
    return directory


def ours(directory) -> list[list[int]]:
    generator = Generator(model.load_pretrained(directory))
    results = generator.generate([Request(input_ids=p, params=GenerationParams(max_new_tokens=MAX_NEW))
                                  for p in PROMPTS])
    return [r.token_ids for r in results]


@torch.no_grad()
def reference(directory) -> list[list[int]]:
    from transformers import T5Gemma2ForConditionalGeneration

    ref = T5Gemma2ForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
    out = []
    for prompt in PROMPTS:  # one by one: no padding, each stops where transformers stops it
        ids = torch.tensor([prompt])
        tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                              num_beams=1)[0].tolist()
        out.append(tokens[1:])  # without the decoder start token, as ours
    return out, ref.generation_config


def a_token_produced_late(outputs: list[list[int]]) -> tuple[int, int, int]:
    """(row, step, token): a token greedy emits at step >= 2 for the first time in its row."""
    for row, tokens in enumerate(outputs):
        for step in range(2, min(6, len(tokens))):
            if tokens[step] not in tokens[:step] and tokens[step] != 1:
                return row, step, tokens[step]
    raise AssertionError(f"no row emits a new token late: {outputs}")


def test_eos_list_in_generation_config_stops_decoding_where_transformers_does(base, tmp_path):
    plain = ours(base)
    row, step, extra = a_token_produced_late(plain)
    assert len(plain[row]) > step + 1  # without the file's list, decoding goes on past that token
    directory = with_generation_config(base, tmp_path, {
        "bos_token_id": 2, "eos_token_id": [1, extra], "pad_token_id": 0,
        # Sampling settings the job does not ask for: shown by inspect, not applied (greedy stays greedy).
        "do_sample": True, "temperature": 0.7, "top_k": 5, "max_new_tokens": 3, "num_beams": 4,
    })
    assert model.load_config(directory).eos_token_ids == (1, extra)
    got = ours(directory)
    assert got[row] == plain[row][: step + 1] and got[row][-1] == extra  # stops right there, the EOS kept
    expected, generation_config = reference(directory)
    assert generation_config.eos_token_id == [1, extra]  # the reference read the same file
    assert got == expected


def test_decoder_start_token_comes_from_generation_config(base, tmp_path):
    directory = with_generation_config(base, tmp_path, {"decoder_start_token_id": 5, "eos_token_id": 1})
    config = model.load_config(directory)
    assert config.bos_token_id == 5 and config.eos_token_ids == (1,)
    got = ours(directory)
    assert got != ours(base)  # another first token, another continuation
    assert got == reference(directory)[0]


def test_keys_the_file_leaves_out_keep_config_json_values(base, tmp_path):
    # transformers would then have no EOS at all and decode to max_new_tokens; we keep config.json's.
    directory = with_generation_config(base, tmp_path, {"temperature": 0.3, "pad_token_id": None})
    config = model.load_config(directory)
    assert (config.eos_token_ids, config.bos_token_id, config.pad_token_id) == ((1,), 2, 0)
    assert dict(config.generation.settings) == {"temperature": 0.3}


def test_settings_are_kept_to_be_shown(base, tmp_path):
    directory = with_generation_config(base, tmp_path, {"eos_token_id": 1, "do_sample": True, "top_p": 0.9,
                                                        "transformers_version": "5.0.0", "_from_model_config": True,
                                                        "use_cache": True, "output_attentions": False})
    generation = model.load_config(directory).generation
    assert generation.eos_token_ids == (1,) and dict(generation.settings) == {"do_sample": True, "top_p": 0.9}


@pytest.mark.parametrize("content, message", [
    ({"eos_token_id": []}, "eos_token_id is an empty list"),
    ({"eos_token_id": [1, 9999]}, r"eos_token_id 9999 is outside the vocabulary \(0\.\.511\)"),
    ({"decoder_start_token_id": "2"}, "decoder_start_token_id must be an integer"),
    ({"bos_token_id": -1}, "bos_token_id -1 is outside the vocabulary"),
])
def test_bad_token_ids_name_the_file_and_field(base, tmp_path, content, message):
    directory = with_generation_config(base, tmp_path, content)
    with pytest.raises(model.ConfigError, match=rf"generation_config\.json: {message}"):
        model.load_config(directory)


def test_malformed_file_names_the_fix(base, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(base, directory)
    (directory / "generation_config.json").write_text("{not json")
    with pytest.raises(model.ConfigError, match=r"generation_config\.json is not valid JSON.*delete it"):
        model.load_config(directory)
