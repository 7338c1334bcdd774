"""model/tokenizer.py against transformers' Gemma tokenizer and Gemma 3 processor.

A real SentencePiece model is trained in the test (tests/helpers/spm.py, Gemma's settings and id
layout), saved into a checkpoint-like directory with a config.json written by transformers'
T5Gemma2Config, and loaded by both sides. The reference is `GemmaTokenizer.from_pretrained(dir)`
(transformers converts the tokenizer.model, as it does offline for a checkpoint without
tokenizer.json) with the image tokens Gemma 3's tokenizer_config.json declares, and a
`Gemma3Processor` built on it. Ids and decoded text must be equal, not close.
"""

from __future__ import annotations

import io
import json
import os
import random

import fsspec
import pytest
import sentencepiece as spm
from transformers import Gemma3Processor, GemmaTokenizer, T5Gemma2Config
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from model.source import CheckpointError
from model.tokenizer import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, PromptError, Tokenizer
from tests.helpers.spm import _CORPUS, special_token_ids, train_sentencepiece

MM_TOKENS = 4  # image tokens per image in the tiny config (a square, as the 4x4 pooling needs)

# As Gemma 3's tokenizer_config.json declares them.
EXTRA_SPECIAL = {"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_TOKEN}

TEXTS = [
    "",
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.\n\nA second paragraph.",
    "Привет, мир! Быстрая коричневая лиса.",
    "你好，世界！敏捷的棕色狐狸跳过了懒狗。",
    "こんにちは世界。東京は大きな都市です。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "שלום עולם",
    "नमस्ते दुनिया।",
    "Emoji 😀🎉👩‍👩‍👧 and rare scripts ᚠᛇᚻ ꦲꦏ",  # not in the pieces: byte fallback
    "   leading spaces, inner   runs,\ttabs\t\tand trailing   ",
    "\n",
    "\n\n\n\n",
    " ",
    "\t",
    "\r\n windows line ends \r\n",
    "digits 1234567890 3.14159 1e-6",
    "def f(x):\n    return x * 2\n",
    "café naïve façade ﬁ ½ ℌ𝔢𝔩𝔩𝔬 e\u0301",  # no normalization: ligatures and combining marks kept
    "literal \u2581 lower-one-eighth block",
    "nul \x00 and bell \x07",
    f"marker {BOI_TOKEN} inside text",
    f"{BOI_TOKEN}{EOI_TOKEN}{IMAGE_TOKEN}",
    "control strings <bos> <eos> <pad> <mask> <unk> in text",
    "nested <bo<bos>s> and <start_of_turn>user\nHi<end_of_turn>",
    "not special: <b> <bos <eos > < pad>",
]


def write_config(directory, ids: dict, **overrides) -> None:
    """A config.json as transformers writes it for a tiny T5Gemma 2."""
    # Covers an image token added past the pieces, as Gemma 3's padded 262,208 covers 262,144.
    vocab_size = max(ids["piece_count"], ids["image"] + 1)
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    encoder = dict(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS,
                   boi_token_index=ids["boi"], eoi_token_index=ids["eoi"])
    config = T5Gemma2Config(encoder=encoder, decoder=dict(text), image_token_index=ids["image"],
                            pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"])
    config.save_pretrained(directory)
    if overrides:
        path = os.path.join(directory, "config.json")
        with open(path) as handle:
            raw = json.load(handle)
        for dotted, value in overrides.items():
            section = raw
            *parents, key = dotted.split(".")
            for parent in parents:
                section = section[parent]
            section[key] = value
        with open(path, "w") as handle:
            json.dump(raw, handle)


def write_preprocessor_config(directory) -> None:
    raw = {"image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
           "size": {"height": 28, "width": 28}, "resample": 2, "do_resize": True, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
           "do_convert_rgb": None, "do_pan_and_scan": None, "image_seq_length": MM_TOKENS}
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as handle:
        json.dump(raw, handle)


def make_checkpoint(directory, *, image_soft_token: bool = True, **config_overrides) -> dict:
    model_path = train_sentencepiece(directory, image_soft_token=image_soft_token)
    ids = special_token_ids(model_path)
    # Gemma 3 style when the model has no image piece: an added token right past the pieces.
    ids.setdefault("image", ids["piece_count"])
    write_config(directory, ids, **config_overrides)
    write_preprocessor_config(directory)
    return ids


def reference_processor(directory, tokenizer):
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil.from_pretrained(directory),
                           tokenizer=tokenizer, image_seq_length=MM_TOKENS)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    ids = make_checkpoint(directory)
    return str(directory), ids


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_pretrained(ckpt[0])


@pytest.fixture(scope="module")
def ref(ckpt):
    return GemmaTokenizer.from_pretrained(ckpt[0], add_bos_token=True, extra_special_tokens=EXTRA_SPECIAL)


@pytest.fixture(scope="module")
def processor(ckpt, ref):
    return reference_processor(ckpt[0], ref)


def fuzz_texts(seed: int, count: int) -> list[str]:
    """Random slices of the training corpus spliced with specials, rare characters and whitespace."""
    rng = random.Random(seed)
    extras = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "<bos>", "<eos>", "<mask>", "<unk>", "<pad>", BOI_TOKEN,
              EOI_TOKEN, IMAGE_TOKEN, "<start_of_turn>", "<", ">", "😀", "\u2581", "Ω", "ᚠ", "\x00", "ﬁ"]
    alphabet = sorted(set("".join(_CORPUS))) + extras
    texts = []
    for _ in range(count):
        if rng.random() < 0.5:
            base = rng.choice(_CORPUS)
            i = rng.randrange(len(base))
            tail = rng.choice(_CORPUS)[: rng.randrange(25)]
            text = base[i : rng.randrange(i, len(base) + 1)] + rng.choice(extras) + tail
        else:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        texts.append(text)
    return texts


# ---- special ids ---------------------------------------------------------------------------


def test_special_ids_come_from_the_checkpoint(tok, ckpt, ref):
    _, ids = ckpt
    s = tok.special
    assert (s.pad, s.eos, s.bos, s.unk) == (ids["pad"], ids["eos"], ids["bos"], ids["unk"]) == (0, 1, 2, 3)
    assert (s.boi, s.eoi, s.image) == (ids["boi"], ids["eoi"], ids["image"])
    assert (s.boi, s.eoi, s.image) == (ref.boi_token_id, ref.eoi_token_id, ref.image_token_id)
    assert s.mm_tokens_per_image == MM_TOKENS
    assert tok.vocab_size == tok.piece_count == ids["piece_count"]


# ---- encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_matches_reference(tok, ref, text):
    assert tok.encode_one(text) == ref(text)["input_ids"]
    assert tok.encode_one(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"]


def test_encode_fuzz_matches_reference(tok, ref):
    texts = fuzz_texts(seed=0, count=1500)
    assert tok.encode(texts) == ref(texts)["input_ids"]


def test_add_eos(tok):
    assert tok.encode_one("Hello", add_eos=True) == tok.encode_one("Hello") + [tok.eos_id]
    assert tok.encode_prompt(BOI_TOKEN, 1, add_bos=False, add_eos=True)[-1] == tok.eos_id


def test_encode_batch_equals_one_by_one(tok):
    assert tok.encode(TEXTS) == [tok.encode_one(t) for t in TEXTS]
    assert tok.encode([]) == []
    with pytest.raises(TypeError):
        tok.encode("a single string")


def test_special_strings_in_text_are_single_ids(tok):
    ids = tok.encode_one(f"a{BOI_TOKEN}b<eos>c<mask>", add_bos=False)
    assert tok.boi_id in ids and tok.eos_id in ids
    assert len([i for i in ids if i in (tok.boi_id, tok.eos_id, tok.piece_to_id("<mask>"))]) == 3


# ---- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_reference(tok, ref, skip):
    encoded = ref(TEXTS + fuzz_texts(seed=1, count=300))["input_ids"]
    assert tok.decode(encoded, skip_special_tokens=skip) == ref.batch_decode(encoded, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_decode_random_ids_matches_reference(tok, ref, skip):
    # Random ids mix byte pieces into invalid UTF-8 runs, specials between bytes, and so on.
    rng = random.Random(2)
    sequences = [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(16))] for _ in range(1500)]
    byte_ids = [i for i in range(tok.piece_count) if tok.id_to_piece(i).startswith("<0x")]
    sequences += [[rng.choice(byte_ids + [tok.eos_id]) for _ in range(rng.randrange(8))] for _ in range(500)]
    assert tok.decode(sequences, skip_special_tokens=skip) == ref.batch_decode(sequences, skip_special_tokens=skip)


def test_decode_inverts_encode(tok):
    # Without specials, and without a literal "▁", which reads back as a space (in the reference too).
    plain = [t for t in TEXTS if "<" not in t and "\u2581" not in t]
    assert tok.decode(tok.encode(plain)) == plain


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode_one([tok.vocab_size])


# ---- image prompts -------------------------------------------------------------------------


def _images(n):
    from PIL import Image

    return [Image.new("RGB", (31 + i, 17), (10 * i, 80, 200)) for i in range(n)]


PROMPTS = [
    ("Describe the picture.", 0),
    (f"{BOI_TOKEN}", 1),
    (f"Caption: {BOI_TOKEN}", 1),
    (f"{BOI_TOKEN} What is shown?", 1),
    (f"Compare {BOI_TOKEN} with{BOI_TOKEN}, please.\n", 2),
    (f"Привет {BOI_TOKEN}\n\n{BOI_TOKEN}мир", 2),
]


@pytest.mark.parametrize("text,num_images", PROMPTS)
def test_prompt_expansion_matches_processor(tok, processor, text, num_images):
    expected = processor(text=[text], images=[_images(num_images)] if num_images else None)["input_ids"][0]
    ours = tok.encode_prompt(text, num_images)
    assert ours == expected
    assert ours.count(tok.image_id) == num_images * MM_TOKENS
    assert ours[0] == tok.bos_id


@pytest.mark.parametrize("num_images", [1, 2])
def test_images_without_text_follow_the_processor(tok, processor, num_images):
    # The processor's rule for images without text: the markers joined by single spaces.
    expected = processor(images=[_images(num_images)])["input_ids"][0]
    assert tok.encode_prompt(None, num_images) == expected
    assert tok.encode_prompt("", num_images) == expected


def test_batch_prompts_equal_one_by_one(tok):
    texts = [t for t, _ in PROMPTS]
    counts = [n for _, n in PROMPTS]
    assert tok.encode_prompts(texts, counts) == [tok.encode_prompt(t, n) for t, n in PROMPTS]


def test_marker_count_mismatch_is_an_error(tok, processor):
    with pytest.raises(PromptError, match="1 image marker"):
        tok.encode_prompt(f"one {BOI_TOKEN}", 2)
    with pytest.raises(PromptError, match="0 image marker"):
        tok.encode_prompt("no marker", 1)
    with pytest.raises(PromptError, match="2 image marker"):
        tok.encode_prompt(f"{BOI_TOKEN}{BOI_TOKEN}", 0)
    # The reference refuses the same prompts.
    with pytest.raises(ValueError):
        processor(text=["no marker"], images=[_images(1)])


def test_literal_image_token_in_prompt_is_an_error(tok):
    # It would claim a vision feature that no image provides.
    with pytest.raises(PromptError, match=IMAGE_TOKEN):
        tok.encode_prompt(f"{BOI_TOKEN} and a stray {IMAGE_TOKEN}", 1)


def test_image_token_from_config_when_not_a_piece(tmp_path):
    # Gemma 3's tokenizer.model has no <image_soft_token> piece: the id comes from config.json.
    ids = make_checkpoint(tmp_path, image_soft_token=False)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.piece_to_id(IMAGE_TOKEN) is None
    assert tok.image_id == ids["image"] == tok.piece_count
    assert tok.vocab_size == tok.piece_count + 1
    ref = GemmaTokenizer.from_pretrained(tmp_path, add_bos_token=True, extra_special_tokens=EXTRA_SPECIAL)
    assert ref.image_token_id == tok.image_id  # transformers appends it right past the pieces, too
    processor = reference_processor(tmp_path, ref)
    for text, n in PROMPTS:
        expected = processor(text=[text], images=[_images(n)] if n else None)["input_ids"][0]
        assert tok.encode_prompt(text, n) == expected
    ids_with_image = tok.encode_prompt(BOI_TOKEN, 1)
    assert tok.decode_one(ids_with_image, skip_special_tokens=False) == ref.decode(ids_with_image)
    assert tok.decode_one(ids_with_image) == ref.decode(ids_with_image, skip_special_tokens=True)


def test_image_token_may_rename_a_reserved_slot(tmp_path):
    # T5Gemma 2 configs name id 256001, a reserved `<unused99>` slot of Gemma's model, as the image
    # token. Here the reserved slot is the control piece <mask>.
    ids = make_checkpoint(tmp_path, image_soft_token=False)
    mask = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).piece_to_id("<mask>")
    write_config(tmp_path, {**ids, "image": mask})
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.image_id == mask
    assert tok.encode_prompt(BOI_TOKEN, 1).count(mask) == MM_TOKENS
    assert tok.decode_one([mask], skip_special_tokens=False) == IMAGE_TOKEN
    assert tok.decode_one([mask]) == ""


def test_image_token_on_an_ordinary_piece_is_refused(tmp_path):
    ids = make_checkpoint(tmp_path, image_soft_token=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ordinary = sp.encode("The quick")[0]
    write_config(tmp_path, {**ids, "image": ordinary})
    with pytest.raises(CheckpointError, match=f"text piece {sp.id_to_piece(ordinary)!r}"):
        Tokenizer.from_pretrained(tmp_path)


# ---- checkpoint problems -------------------------------------------------------------------


def test_missing_tokenizer_model_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model" * 10)
    with pytest.raises(CheckpointError, match="not a usable SentencePiece model"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("encoder.boi_token_index", 100, "encoder.boi_token_index is 100"),
        ("eoi_token_index", 101, "eoi_token_index is 101"),
        ("image_token_index", 102, "image_token_index is 102"),
        ("encoder.image_token_index", 103, "encoder.image_token_index is 103"),
        ("eos_token_id", 5, "eos_token_id is 5"),
        ("decoder.pad_token_id", 1, "decoder.pad_token_id is 1"),
        ("encoder.text_config.bos_token_id", 0, "encoder.text_config.bos_token_id is 0"),
        ("vocab_size", 100, "vocab_size is 100"),
    ],
)
def test_config_mismatch_is_an_error(tmp_path, field, value, match):
    make_checkpoint(tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=match):
        Tokenizer.from_pretrained(tmp_path)


def test_eos_list_must_contain_the_models_eos(tmp_path):
    make_checkpoint(tmp_path, eos_token_id=[1, 6])
    assert Tokenizer.from_pretrained(tmp_path).eos_id == 1
    make_checkpoint(tmp_path, eos_token_id=[6])
    with pytest.raises(CheckpointError, match="eos_token_id"):
        Tokenizer.from_pretrained(tmp_path)


def test_image_token_absent_everywhere_disables_image_prompts_only(tmp_path):
    # No config.json and no image piece: text works, image prompts say what is missing.
    train_sentencepiece(tmp_path, image_soft_token=False)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.image_id is None and tok.mm_tokens_per_image is None
    assert tok.encode_one("Hello") == tok.encode_prompt("Hello", 0)
    with pytest.raises(CheckpointError, match="image, mm_tokens_per_image"):
        tok.encode_prompt(BOI_TOKEN, 1)


@pytest.mark.parametrize(
    "options",
    [dict(normalization_rule_name="nmt_nfkc"), dict(add_dummy_prefix=True), dict(remove_extra_whitespaces=True),
     dict(byte_fallback=False)],
    ids=["nfkc", "dummy_prefix", "collapse_whitespace", "no_byte_fallback"],
)
def test_non_gemma_sentencepiece_settings_are_refused(tmp_path, options):
    buffer = io.BytesIO()
    settings = dict(sentence_iterator=iter(_CORPUS * 8), model_writer=buffer, model_type="bpe", vocab_size=768,
                    hard_vocab_limit=False, byte_fallback=True, character_coverage=0.99, add_dummy_prefix=False,
                    normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    spm.SentencePieceTrainer.train(**{**settings, **options})
    (tmp_path / "tokenizer.model").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="Gemma's SentencePiece settings"):
        Tokenizer.from_pretrained(tmp_path)


def test_loads_through_fsspec(ckpt, tok):
    # Any fsspec filesystem works: copy the checkpoint to the in-memory one and load from there.
    fs = fsspec.filesystem("memory")
    for name in ("tokenizer.model", "config.json"):
        with open(os.path.join(ckpt[0], name), "rb") as handle:
            fs.pipe(f"/tok-ckpt/{name}", handle.read())
    remote = Tokenizer.from_pretrained("memory://tok-ckpt")
    assert remote.special == tok.special
    assert remote.encode(TEXTS) == tok.encode(TEXTS)


def test_helper_training_is_deterministic(tmp_path):
    a = train_sentencepiece(tmp_path / "a")
    b = train_sentencepiece(tmp_path / "b")
    assert open(a, "rb").read() == open(b, "rb").read()


def test_pickles_for_ray_workers(tok):
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    assert clone.special == tok.special
    assert clone.encode(TEXTS) == tok.encode(TEXTS)
