"""model/tokenizer.py on a checkpoint with tokenizer.json and no tokenizer.model.

As a user gets one: transformers converts a real SentencePiece model trained in the test
(tests/helpers/spm.py) into a fast Gemma tokenizer, save_pretrained writes tokenizer.json and
tokenizer_config.json, and tokenizer.model is deleted. The reference is transformers' AutoTokenizer
loaded from that directory (and a Gemma3Processor on it for image prompts); the SentencePiece
tokenizer of the same model is the other side: ids must equal both, on varied text with special
tokens, whitespace runs and rare unicode, and prompts with images.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil

import fsspec
import pytest
from transformers import AutoTokenizer, GemmaTokenizer

from model.source import CheckpointError
from model.tokenizer import BOI_TOKEN, IMAGE_TOKEN, TOKENIZER_FILE, TOKENIZER_JSON, Tokenizer
from tests.model.test_tokenizer import (
    EXTRA_SPECIAL,
    PROMPTS,
    TEXTS,
    _images,
    fuzz_texts,
    make_checkpoint,
    reference_processor,
)


def convert_to_tokenizer_json(sp_directory, directory) -> None:
    """A copy of a checkpoint whose tokenizer is tokenizer.json (+ tokenizer_config.json) only."""
    shutil.copytree(sp_directory, directory)
    converted = GemmaTokenizer.from_pretrained(sp_directory, add_bos_token=True, extra_special_tokens=EXTRA_SPECIAL)
    converted.save_pretrained(directory)
    os.remove(os.path.join(directory, TOKENIZER_FILE))


@pytest.fixture(scope="module", params=[True, False], ids=["image-piece", "image-added"])
def dirs(request, tmp_path_factory):
    """(SentencePiece checkpoint, the same as tokenizer.json): the image token a piece, or added past them."""
    sp_dir = tmp_path_factory.mktemp("sp")
    make_checkpoint(sp_dir, image_soft_token=request.param)
    json_dir = tmp_path_factory.mktemp("json") / "ckpt"
    convert_to_tokenizer_json(sp_dir, json_dir)
    return str(sp_dir), str(json_dir)


@pytest.fixture(scope="module")
def tok(dirs):
    return Tokenizer.from_pretrained(dirs[1])


@pytest.fixture(scope="module")
def sp_tok(dirs):
    return Tokenizer.from_pretrained(dirs[0])


@pytest.fixture(scope="module")
def ref(dirs):
    return AutoTokenizer.from_pretrained(dirs[1])


def test_the_directory_has_no_tokenizer_model(dirs, tok, sp_tok):
    assert sorted(f for f in os.listdir(dirs[1]) if f.startswith("tokenizer")) == [TOKENIZER_JSON,
                                                                                   "tokenizer_config.json"]
    assert tok.file == TOKENIZER_JSON and sp_tok.file == TOKENIZER_FILE


def test_special_ids_equal_the_reference_and_the_sentencepiece_path(tok, sp_tok, ref):
    assert tok.special == sp_tok.special
    s = tok.special
    assert (s.pad, s.eos, s.bos, s.unk) == (ref.pad_token_id, ref.eos_token_id, ref.bos_token_id, ref.unk_token_id)
    assert (s.boi, s.eoi, s.image) == (ref.boi_token_id, ref.eoi_token_id, ref.image_token_id)
    assert tok.vocab_size == sp_tok.vocab_size


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_matches_reference(tok, sp_tok, ref, text):
    assert tok.encode_one(text) == ref(text)["input_ids"] == sp_tok.encode_one(text)
    assert tok.encode_one(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"]


def test_encode_fuzz_matches_reference_and_sentencepiece(tok, sp_tok, ref):
    texts = fuzz_texts(seed=5, count=1500)
    assert tok.encode(texts) == ref(texts)["input_ids"] == sp_tok.encode(texts)


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_reference(tok, ref, skip):
    rng = random.Random(3)
    sequences = ref(TEXTS + fuzz_texts(seed=6, count=300))["input_ids"]
    sequences += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(16))] for _ in range(1000)]
    byte_ids = [i for i in range(tok.piece_count) if tok.id_to_piece(i).startswith("<0x")]
    sequences += [[rng.choice(byte_ids + [tok.eos_id]) for _ in range(rng.randrange(8))] for _ in range(300)]
    assert tok.decode(sequences, skip_special_tokens=skip) == ref.batch_decode(sequences, skip_special_tokens=skip)


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode_one([tok.vocab_size])


@pytest.mark.parametrize("text,num_images", PROMPTS)
def test_image_prompts_equal_the_processor_and_the_sentencepiece_path(tok, sp_tok, dirs, ref, text, num_images):
    processor = reference_processor(dirs[1], ref)
    expected = processor(text=[text], images=[_images(num_images)] if num_images else None)["input_ids"][0]
    assert tok.encode_prompt(text, num_images) == expected == sp_tok.encode_prompt(text, num_images)
    texts, counts = [t for t, _ in PROMPTS], [n for _, n in PROMPTS]
    assert tok.encode_prompts(texts, counts) == sp_tok.encode_prompts(texts, counts)
    assert tok.encode_prompt(None, 2) == sp_tok.encode_prompt(None, 2)


def test_literal_image_token_is_refused_as_on_the_sentencepiece_path(tok):
    from model.tokenizer import PromptError

    with pytest.raises(PromptError, match=IMAGE_TOKEN):
        tok.encode_prompt(f"{BOI_TOKEN} and {IMAGE_TOKEN}", 1)


def test_tokenizer_model_is_preferred_when_both_are_present(dirs, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(dirs[0], both)
    # A tokenizer.json that could not be read: it must not even be opened.
    (both / TOKENIZER_JSON).write_text("{not a tokenizer")
    assert Tokenizer.from_pretrained(both).file == TOKENIZER_FILE


def test_special_tokens_come_from_tokenizer_config(dirs, tmp_path):
    # Named differently there, the ids follow, as transformers' do.
    directory = tmp_path / "renamed"
    shutil.copytree(dirs[1], directory)
    names = json.loads((directory / "tokenizer_config.json").read_text())
    names.update(eos_token="<mask>", pad_token={"__type": "AddedToken", "content": "<end_of_turn>", "special": True,
                                                  "lstrip": False, "rstrip": False, "normalized": False,
                                                  "single_word": False})
    (directory / "tokenizer_config.json").write_text(json.dumps(names))
    ref = AutoTokenizer.from_pretrained(directory)
    text = (directory / TOKENIZER_JSON).read_text()
    tok = Tokenizer.from_tokenizer_json(text, names)  # config.json's eos/pad would now disagree: left out
    assert (tok.eos_id, tok.pad_id) == (ref.eos_token_id, ref.pad_token_id) == (tok.piece_to_id("<mask>"),
                                                                                tok.piece_to_id("<end_of_turn>"))
    assert tok.encode_one("hi", add_eos=True)[-1] == tok.eos_id
    # Without tokenizer_config.json: Gemma's names.
    plain = Tokenizer.from_tokenizer_json(text, None).special
    assert (plain.pad, plain.eos, plain.bos, plain.unk) == (0, 1, 2, 3)


@pytest.mark.parametrize("decoder_listed", [False, True], ids=["legacy", "added_tokens_decoder"])
def test_special_tokens_map_is_read_as_transformers_reads_it(dirs, tmp_path, decoder_listed):
    directory = tmp_path / "ckpt"
    shutil.copytree(dirs[1], directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    if decoder_listed:  # as transformers 4 wrote it: then special_tokens_map.json is not read at all
        ref = AutoTokenizer.from_pretrained(dirs[1])
        config["added_tokens_decoder"] = {str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip,
                                                   "rstrip": t.rstrip, "normalized": t.normalized,
                                                   "single_word": t.single_word}
                                          for i, t in ref.added_tokens_decoder.items()}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<mask>", "bos_token": "<eos>"}))
    raw = json.loads((directory / "config.json").read_text())
    for section in (raw, raw["decoder"], raw["encoder"]["text_config"]):
        section.pop("eos_token_id", None)
        section.pop("bos_token_id", None)
    (directory / "config.json").write_text(json.dumps(raw))
    tok = Tokenizer.from_pretrained(directory)
    ref = AutoTokenizer.from_pretrained(directory)
    assert (tok.eos_id, tok.bos_id) == (ref.eos_token_id, ref.bos_token_id)
    if decoder_listed:
        assert (tok.eos_id, tok.bos_id) == (1, 2)  # tokenizer_config.json's bos, Gemma's default eos
    else:
        assert (tok.eos_id, tok.bos_id) == (tok.piece_to_id("<mask>"), 1)  # the map's names win


def test_config_json_ids_are_cross_checked(dirs, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(dirs[1], directory)
    raw = json.loads((directory / "config.json").read_text())
    raw["decoder"]["eos_token_id"] = 7
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"decoder\.eos_token_id is 7.*tokenizer\.json come from different"):
        Tokenizer.from_pretrained(directory)


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / TOKENIZER_JSON).write_text("{broken"), r"tokenizer\.json is not a usable tokenizer\.json"),
    (lambda d: (d / TOKENIZER_JSON).unlink(), r"has no tokenizer\.model .* and no tokenizer\.json"),
    (lambda d: (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"})),
     r"has no token '<nope>', which tokenizer_config\.json names as eos_token"),
    (lambda d: (d / "tokenizer_config.json").write_text(json.dumps({"image_token": "<img>"})),
     r"names image_token '<img>'; T5Gemma 2 prompts use '<image_soft_token>'"),
    (lambda d: (d / "tokenizer_config.json").write_text("[1, 2]"), r"tokenizer_config\.json must hold a JSON object"),
])
def test_bad_files_name_the_problem(dirs, tmp_path, edit, message):
    directory = tmp_path / "ckpt"
    shutil.copytree(dirs[1], directory)
    edit(directory)
    with pytest.raises(CheckpointError, match=message):
        Tokenizer.from_pretrained(directory)


def test_loads_through_fsspec_and_pickles(dirs, tok):
    fs = fsspec.filesystem("memory")
    for name in os.listdir(dirs[1]):
        with open(os.path.join(dirs[1], name), "rb") as handle:
            fs.pipe(f"/tok-json-{id(tok)}/{name}", handle.read())
    remote = Tokenizer.from_pretrained(f"memory://tok-json-{id(tok)}")
    assert remote.file == TOKENIZER_JSON and remote.special == tok.special
    assert remote.encode(TEXTS) == tok.encode(TEXTS)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS) == tok.encode(TEXTS) and clone.decode(tok.encode(TEXTS)) == tok.decode(tok.encode(TEXTS))


def test_inspect_says_which_file_was_read(tiny_checkpoint, tmp_path):
    from model import inspect_checkpoint

    assert inspect_checkpoint(str(tiny_checkpoint)).tokenizer_file == TOKENIZER_FILE
    directory = tmp_path / "ckpt"
    convert_to_tokenizer_json(tiny_checkpoint, directory)
    summary = inspect_checkpoint(str(directory), needs_images=True)
    assert summary.tokenizer_file == TOKENIZER_JSON and summary.image_tokens
