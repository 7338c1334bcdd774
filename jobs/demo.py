"""`t5g2 demo`: a small multilingual dataset, a tiny random checkpoint, and five jobs run end to end.

What it does, with nothing downloaded:
  1. writes a demo dataset as Parquet shards under OUT/data/: documents in eleven languages and
     eight scripts, generated from word lists (docs/), and images drawn with Pillow in PNG, JPEG
     and WEBP, some with EXIF orientation (images/, an HF-datasets `{bytes, path}` struct column);
     a few rows are deliberately bad (empty or null text, a truncated image, bytes that are not an
     image, a null image) so the run report shows per-row error handling;
  2. trains a SentencePiece tokenizer on that corpus with Gemma's special ids and writes a
     randomly initialised T5Gemma 2 checkpoint in the real Hugging Face layout (config.json,
     model.safetensors, tokenizer.model, preprocessor_config.json) to OUT/checkpoint/;
  3. writes summarize, caption and translate job files to OUT/jobs/, and two labeling jobs:
     classify-topics (each document's topic, chosen among fixed labels by scoring them, the
     document's language kept beside it) and ask-images (a yes/no question on every image, also
     by scoring); prints the dry run of the first (`t5g2 run JOB.toml --dry-run`: what it would
     compute and cost), runs them on a local Ray, then prints each run report and a few output rows.

What it is not: a quality demo. The weights are random, so the generated text is fluent nonsense in
the demo vocabulary; the demo shows the machinery (sharded reads, CPU actors, per-row errors,
one output row per input row, the report), not the model. To run a real checkpoint see the
README ("Using a real checkpoint").

Everything is seeded: the same arguments give the same dataset, tokenizer and weights.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
from PIL import Image, ImageDraw, ImageFont

DEFAULT_OUT = "demo-out"
DEFAULT_ROWS = 300
DEFAULT_MAX_NEW_TOKENS = 16
SEED = 2024

# Sub-directories of OUT that the demo owns; only these are ever deleted, so pointing --out at a
# directory that holds other things cannot lose them.
DATA_DIR, CHECKPOINT_DIR, JOBS_DIR, OUTPUTS_DIR = "data", "checkpoint", "jobs", "outputs"
MANIFEST = "demo-manifest.json"

DOC_SHARDS = 4
IMAGE_SHARDS = 3
SENTENCE_SHARDS = 2


# ---- documents --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Language:
    """How to write sentences in one language from a word list."""

    name: str  # English name, as translate prompts name languages
    script: str  # writing system, reported in the `script` column
    words: tuple[str, ...]  # vocabulary the sentences are drawn from
    joiner: str = " "  # between words ("" for scripts written without spaces)
    cased: bool = True  # capitalise the first letter of a sentence
    stops: tuple[str, ...] = (".", ".", ".", "?", "!")  # sentence ends, weighted by repetition
    comma: str = ","


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# The same few dozen everyday words in each language: city, river, market, people, seasons, school,
# trains, music... Random sequences of them are not grammatical, but they exercise every script's
# characters, word lengths and punctuation the way real text does, which is what a tokenizer and a
# batch pipeline care about.
LANGUAGES: dict[str, Language] = {
    "en": Language("English", "Latin", _words(
        "the city river market morning people old new small large house garden road school children "
        "water light winter summer report year village bridge train station museum library teacher "
        "farmer bread music festival mountain forest and with very today near opens closes visits "
        "builds reads writes sells carries")),
    "de": Language("German", "Latin", _words(
        "die Stadt der Fluss Markt Morgen Menschen alt neu klein groß Haus Garten Straße Schule Kinder "
        "Wasser Licht Winter Sommer Bericht Jahr Dorf Brücke Zug Bahnhof Museum Bibliothek Lehrer Bauer "
        "Brot Musik Fest Berg Wald und mit sehr heute über öffnet schließt besucht baut liest schreibt")),
    "fr": Language("French", "Latin", _words(
        "la ville le fleuve marché matin gens vieux nouveau petit grand maison jardin route école enfants "
        "eau lumière hiver été rapport année village pont train gare musée bibliothèque professeur pain "
        "musique fête montagne forêt et avec très aujourd'hui près ouvre ferme visite construit lit écrit")),
    "es": Language("Spanish", "Latin", _words(
        "la ciudad el río mercado mañana gente viejo nuevo pequeño grande casa jardín camino escuela niños "
        "agua luz invierno verano informe año pueblo puente tren estación museo biblioteca maestro pan "
        "música fiesta montaña bosque y con muy hoy cerca abre cierra visita construye lee escribe"),
        stops=(".", ".", ".", "?", "!")),
    "ru": Language("Russian", "Cyrillic", _words(
        "город река рынок утро люди старый новый маленький большой дом сад дорога школа дети вода свет "
        "зима лето отчёт год деревня мост поезд вокзал музей библиотека учитель фермер хлеб музыка "
        "праздник гора лес и с очень сегодня рядом открывает закрывает строит читает пишет")),
    "el": Language("Greek", "Greek", _words(
        "η πόλη το ποτάμι αγορά πρωί άνθρωποι παλιός νέος μικρός μεγάλος σπίτι κήπος δρόμος σχολείο "
        "παιδιά νερό φως χειμώνας καλοκαίρι αναφορά χρόνος χωριό γέφυρα τρένο σταθμός μουσείο "
        "βιβλιοθήκη δάσκαλος ψωμί μουσική γιορτή βουνό δάσος και με πολύ σήμερα κοντά ανοίγει διαβάζει"),
        stops=(".", ".", ".", ";", "!")),  # Greek writes its question mark as ";"
    "ar": Language("Arabic", "Arabic", _words(
        "مدينة نهر سوق صباح ناس قديم جديد صغير كبير بيت حديقة طريق مدرسة أطفال ماء ضوء شتاء صيف تقرير "
        "سنة قرية جسر قطار محطة متحف مكتبة معلم مزارع خبز موسيقى مهرجان جبل غابة و في على مع جدا "
        "اليوم قرب يفتح يغلق يزور يبني يقرأ يكتب"),
        cased=False, stops=(".", ".", ".", "؟", "!"), comma="،"),
    "hi": Language("Hindi", "Devanagari", _words(
        "शहर नदी बाज़ार सुबह लोग पुराना नया छोटा बड़ा घर बगीचा सड़क स्कूल बच्चे पानी रोशनी सर्दी गर्मी "
        "रिपोर्ट साल गाँव पुल रेलगाड़ी स्टेशन संग्रहालय पुस्तकालय शिक्षक किसान रोटी संगीत त्योहार पहाड़ "
        "जंगल और में पर के बहुत आज पास खोलता बनाता पढ़ता लिखता है"),
        cased=False, stops=("।", "।", "।", "?")),
    "zh": Language("Chinese", "Han", _words(
        "城市 河流 市场 早晨 人们 古老 新的 小 大 房子 花园 道路 学校 孩子 水 光 冬天 夏天 报告 年 "
        "村庄 桥 火车 车站 博物馆 图书馆 老师 农民 面包 音乐 节日 山 森林 和 在 很 今天 附近 打开 "
        "关闭 参观 建造 阅读 写"),
        joiner="", cased=False, stops=("。", "。", "。", "？", "！"), comma="，"),
    "ja": Language("Japanese", "Kanji and kana", _words(
        "都市 川 市場 朝 人々 古い 新しい 小さな 大きな 家 庭 道 学校 子供たち 水 光 冬 夏 報告 年 "
        "村 橋 電車 駅 博物館 図書館 先生 農家 パン 音楽 祭り 山 森 と の で は を とても 今日 近く "
        "開く 閉じる 訪れる 読む 書く"),
        joiner="", cased=False, stops=("。", "。", "。", "？"), comma="、"),
    "ko": Language("Korean", "Hangul", _words(
        "도시 강 시장 아침 사람들 오래된 새로운 작은 큰 집 정원 길 학교 아이들 물 빛 겨울 여름 "
        "보고서 해 마을 다리 기차 역 박물관 도서관 선생님 농부 빵 음악 축제 산 숲 그리고 에서 "
        "아주 오늘 근처 엽니다 닫습니다 방문합니다 읽습니다 씁니다"),
        cased=False),
}


def _sentence(lang: Language, rng: random.Random) -> str:
    words = [rng.choice(lang.words) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.15:  # figures and years, so digits (split one per token) appear too
        words.insert(rng.randrange(len(words)), rng.choice([str(rng.randint(1900, 2030)),
                                                            f"{rng.randint(1, 99)}.{rng.randint(0, 9)}",
                                                            f"{rng.randint(2, 99)}%"]))
    if len(words) > 7 and rng.random() < 0.4:
        words[len(words) // 2] += lang.comma
    text = lang.joiner.join(words)
    if lang.cased:
        text = text[0].upper() + text[1:]
    return text + rng.choice(lang.stops)


def _document(lang: Language, rng: random.Random) -> str:
    # Mostly short documents, a tenth long ones: long inputs exceed the demo model's sliding
    # window and make the token-budget batching pack unevenly, as real corpora do.
    paragraphs = rng.randint(6, 10) if rng.random() < 0.1 else rng.randint(1, 3)
    sentence_joiner = "" if lang.joiner == "" else " "
    body = "\n\n".join(
        sentence_joiner.join(_sentence(lang, rng) for _ in range(rng.randint(1, 5))) for _ in range(paragraphs)
    )
    if rng.random() < 0.3:  # a title line, as scraped articles have
        title = lang.joiner.join(rng.choice(lang.words) for _ in range(rng.randint(2, 5)))
        body = (title[0].upper() + title[1:] if lang.cased else title) + "\n\n" + body
    return body


def make_documents(rows: int, seed: int = SEED) -> list[dict]:
    """`rows` documents (id, language, script, text) cycling through LANGUAGES, two of them bad.

    The bad rows, one empty text and one null text, sit inside the data (not at an end) so they
    travel through a shard and a batch together with good rows.
    """
    if rows < 4:
        raise ValueError(f"--rows must be at least 4 (two good documents and two bad rows), got {rows}")
    rng = random.Random(seed)
    codes = list(LANGUAGES)
    bad_at = {rows // 3: "", (2 * rows) // 3: None}
    documents = []
    for index in range(rows):
        code = codes[index % len(codes)]
        lang = LANGUAGES[code]
        text = bad_at[index] if index in bad_at else _document(lang, rng)
        documents.append({"id": f"doc-{index:05d}", "language": code, "script": lang.script, "text": text})
    return documents


def make_sentences(rows: int, seed: int = SEED) -> list[dict]:
    """`rows` short German sentences (id, text) for the translate job, one of them empty.

    One source language per job keeps the translate prompt honest ("from German to English");
    German is the demo's Latin-script language with the most non-ASCII letters. The empty text
    is there so the translate report shows a per-row error too.
    """
    rng = random.Random(seed + 1)
    german = LANGUAGES["de"]
    sentences = [{"id": f"sent-{i:05d}", "text": _sentence(german, rng)} for i in range(rows - 1)]
    sentences.insert(len(sentences) // 2, {"id": "sent-bad-empty", "text": ""})
    return sentences


# ---- images -----------------------------------------------------------------------------------

_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (250, 250, 250),
    "teal": (30, 150, 150), "pink": (240, 130, 180),
}
_SHAPES = ("circle", "square", "triangle", "ellipse", "star")
_LABELS = ("HELLO", "STOP", "OPEN", "EXIT", "SALE 50%", "CAFE", "No 42", "2024", "ZOO", "T5 GEMMA")
# EXIF orientation values: 3 = stored upside down, 6 = needs 90° clockwise, 8 = 90° counter-clockwise.
_ORIENTATIONS = (3, 6, 8)
EXIF_ORIENTATION_TAG = 0x0112


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _draw_shapes(draw: ImageDraw.ImageDraw, size, rng: random.Random, background: str | None = None) -> str:
    width, height = size
    names = []
    for _ in range(rng.randint(1, 3)):
        colour = rng.choice([c for c in _COLOURS if c not in ("white", background)])
        shape = rng.choice(_SHAPES)
        r = rng.randint(min(width, height) // 8, min(width, height) // 3)
        cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
        fill = _COLOURS[colour]
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "ellipse":
            draw.ellipse((cx - r, cy - r // 2, cx + r, cy + r // 2), fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.regular_polygon((cx, cy, r), n_sides=5, rotation=rng.randint(0, 71), fill=fill)
        names.append(f"{_article(colour)} {colour} {shape}")
    return " and ".join(names)


def _gradient(size, rng: random.Random) -> tuple[Image.Image, str]:
    width, height = size
    start, end = rng.sample(list(_COLOURS), 2)
    a, b = _COLOURS[start], _COLOURS[end]
    horizontal = rng.random() < 0.5
    span = width if horizontal else height
    strip = Image.new("RGB", (span, 1))
    strip.putdata([tuple(round(a[c] + (b[c] - a[c]) * i / max(span - 1, 1)) for c in range(3))
                   for i in range(span)])
    if horizontal:
        image = strip.resize((width, height))
    else:
        image = strip.resize((height, width)).transpose(Image.Transpose.ROTATE_270)
    direction = "left to right" if horizontal else "top to bottom"
    return image, f"a gradient from {start} to {end}, {direction}"


def _picture(kind: str, size, rng: random.Random) -> tuple[Image.Image, str]:
    width, height = size
    if kind == "gradient":
        image, what = _gradient(size, rng)
        draw = ImageDraw.Draw(image)
        return image, what + " with " + _draw_shapes(draw, size, rng)
    background = rng.choice(list(_COLOURS))
    image = Image.new("RGB", size, _COLOURS[background])
    draw = ImageDraw.Draw(image)
    if kind == "shapes":
        return image, _draw_shapes(draw, size, rng, background) + f" on {background}"
    if kind == "stripes":
        colour = rng.choice([c for c in _COLOURS if c != background])
        step = rng.randint(4, 16)
        for x in range(0, width, 2 * step):
            draw.rectangle((x, 0, x + step - 1, height), fill=_COLOURS[colour])
        return image, f"vertical {colour} stripes on {background}"
    # Text: what a sign or a label looks like; large enough to survive the resize to 64 px.
    label = rng.choice(_LABELS)
    ink = "black" if background in ("white", "yellow", "pink", "orange") else "white"
    # Sized to fit: the bundled font's glyphs are about 0.6 of its size wide.
    font = _font(max(8, min(height // 3, int(width * 0.8 / (0.6 * len(label))))))
    draw.text((width // 10, height // 3), label, fill=_COLOURS[ink], font=font)
    return image, f"the text '{label}' in {ink} on {background}"


def _encode(image: Image.Image, fmt: str, rng: random.Random, orientation: int | None) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    note = ""
    if fmt == "PNG":
        # PNG rows also cover the other pixel modes a dataset carries: grey, palette, alpha.
        mode = rng.choice(["RGB", "RGBA", "L", "P"])
        if mode == "RGBA":
            image = image.convert("RGBA")
            image.putalpha(Image.new("L", image.size, 200))
        elif mode != "RGB":
            image = image.convert(mode)
        note = f", {mode}"
        image.save(buffer, "PNG")
    elif fmt == "JPEG":
        kwargs = {"quality": rng.randint(60, 95)}
        if orientation:
            exif = Image.Exif()
            exif[EXIF_ORIENTATION_TAG] = orientation
            kwargs["exif"] = exif.tobytes()
            note = f", EXIF orientation {orientation}"
        image.save(buffer, "JPEG", **kwargs)
    else:
        image.save(buffer, "WEBP", quality=80)
    return buffer.getvalue(), note


def _store_unrotated(image: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera would store for a picture meant to be seen as `image` under `orientation`.

    A reader that applies EXIF orientation gets `image` back; one that ignores it sees it rotated.
    """
    inverse = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    return image.transpose(inverse[orientation])


# The bad image rows and the error kind each should get (operators/columns.py ERROR_KINDS).
BAD_IMAGE_ERRORS = {"img-bad-truncated": "image_decode", "img-bad-not-an-image": "image_decode",
                    "img-bad-null": "image_missing"}


def make_images(count: int, seed: int = SEED) -> list[dict]:
    """`count` image rows (id, image {bytes, path}, drawn), three of them bad.

    `drawn` says what was drawn, as a reference to read the captions against. The bad rows are a
    JPEG cut in half, bytes that are not an image, and a null image.
    """
    if count < 6:
        raise ValueError(f"the image dataset needs at least 6 rows (three good, three bad), got {count}")
    rng = random.Random(seed + 2)
    kinds = ("shapes", "gradient", "text", "stripes")
    formats = ("PNG", "JPEG", "WEBP")
    rows = []
    jpegs = 0
    for index in range(count - 3):
        # 4 kinds x 3 formats cycle independently, so even a small dataset has every format.
        kind, fmt = kinds[index % len(kinds)], formats[index % len(formats)]
        size = (rng.choice([48, 64, 96, 128, 200, 320]), rng.choice([48, 64, 96, 120, 180, 240]))
        picture, what = _picture(kind, size, rng)
        orientation = None
        if fmt == "JPEG":
            # Every other JPEG is stored as a camera would store it, rotated, with an EXIF tag.
            orientation = _ORIENTATIONS[(jpegs // 2) % len(_ORIENTATIONS)] if jpegs % 2 == 0 else None
            jpegs += 1
        stored = _store_unrotated(picture, orientation) if orientation else picture
        data, note = _encode(stored, fmt, rng, orientation)
        name = f"img-{index:04d}.{fmt.lower().replace('jpeg', 'jpg')}"
        rows.append({"id": f"img-{index:04d}", "image": {"bytes": data, "path": name},
                     "drawn": f"{what} ({fmt}, {size[0]}x{size[1]}{note})"})
    truncated = next(r for r in rows if r["image"]["path"].endswith(".jpg"))["image"]["bytes"]
    bad = [
        {"id": "img-bad-truncated", "image": {"bytes": truncated[: len(truncated) // 2], "path": "truncated.jpg"},
         "drawn": "a JPEG cut off half-way"},
        {"id": "img-bad-not-an-image", "image": {"bytes": b"this is plain text, not an image", "path": "notes.png"},
         "drawn": "text bytes named .png"},
        {"id": "img-bad-null", "image": None, "drawn": "no image at all"},
    ]
    for row in bad:
        row["drawn"] += f" (expected error: {BAD_IMAGE_ERRORS[row['id']]})"
    for offset, row in enumerate(bad):  # spread through the data, not bunched at the end
        rows.insert((offset + 1) * len(rows) // 4, row)
    return rows


# ---- Parquet ----------------------------------------------------------------------------------

# As Hugging Face `datasets` stores an Image feature: a struct of the encoded bytes and a file name.
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _hf_features_metadata(features: dict) -> dict:
    """Schema metadata `datasets` writes, so `load_dataset("parquet", ...)` decodes the image column."""
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


DOC_SCHEMA = pa.schema(
    [("id", pa.string()), ("language", pa.string()), ("script", pa.string()), ("text", pa.string())],
    metadata=_hf_features_metadata({name: {"dtype": "string", "_type": "Value"}
                                    for name in ("id", "language", "script", "text")}),
)
SENTENCE_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
IMAGE_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", IMAGE_STRUCT), ("drawn", pa.string())],
    metadata=_hf_features_metadata({"id": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"},
                                    "drawn": {"dtype": "string", "_type": "Value"}}),
)


def write_shards(rows: list[dict], schema: pa.Schema, directory: Path, shards: int) -> list[Path]:
    """Split `rows` in order into `shards` Parquet files named part-00000.parquet, ..."""
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    shards = max(1, min(shards, len(rows)))
    bounds = [round(i * len(rows) / shards) for i in range(shards + 1)]
    paths = []
    for index in range(shards):
        path = directory / f"part-{index:05d}.parquet"
        pq.write_table(table.slice(bounds[index], bounds[index + 1] - bounds[index]), path)
        paths.append(path)
    return paths


# ---- tokenizer and checkpoint -----------------------------------------------------------------

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")
TOKENIZER_VOCAB = 2048



def _prompt_lines() -> list[str]:
    """The default task prompts as plain text, so prompt words become whole pieces of the demo
    vocabulary (as with Gemma's real one) rather than bytes."""
    from pipeline.tasks import TASK_KINDS

    lines = []
    prompts = [kind.template for kind in TASK_KINDS.values() if kind.template]
    prompts += [job.task["prompt"] for job in DEMO_JOBS if "prompt" in job.task]
    for prompt in prompts:
        prompt = prompt.format(text="", image="", source_language="German", target_language="English", labels="")
        lines += [line for line in prompt.split("\n") if line.strip()]
    lines += [label for job in DEMO_JOBS for label in job.task.get("labels", ())]
    return lines


def train_gemma_sentencepiece(
    lines: list[str],
    vocab_size: int,
    *,
    character_coverage: float,
    max_sentence_length: int,
    image_soft_token: bool = True,
) -> bytes:
    """Train a BPE SentencePiece model with Gemma 3's tokenizer.model settings; return its bytes.

    BPE with byte fallback, no dummy prefix, identity normalization, whitespace kept, digits
    split; pad=0 eos=1 bos=2 unk=3, `<mask>` a control symbol, the turn and image markers
    user-defined symbols (so they are single, never-split pieces). model/tokenizer.py refuses
    models without these settings. `image_soft_token=False` leaves `<image_soft_token>` out of
    the pieces, as in Gemma 3's own file, where its id comes from config.json. The tests'
    tokenizers (tests/helpers/spm.py) are trained here too, so the recipe lives in one place.
    """
    user_defined = [*TURN_MARKERS, BOI, EOI] + ([IMAGE] if image_soft_token else [])
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not reach vocab_size; stop short, don't fail
        byte_fallback=True,  # characters outside the pieces become byte tokens, never <unk>
        character_coverage=character_coverage,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece=PAD, eos_piece=EOS, bos_piece=BOS, unk_piece=UNK,
        control_symbols=["<mask>"],
        user_defined_symbols=user_defined,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=max_sentence_length,
        num_threads=1,  # one thread keeps the merge order, hence the bytes, deterministic
        minloglevel=2,
    )
    return buffer.getvalue()


def train_tokenizer(directory: Path, texts: list[str], vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """Train the demo's Gemma-like SentencePiece model on `texts`; write `directory/tokenizer.model`.

    For a corpus a hundred times larger than the tests' one, a higher character coverage (so the
    demo's CJK characters get pieces of their own) and longer training lines (whole paragraphs).
    """
    lines = [line for text in texts for line in text.split("\n") if line.strip()] + _prompt_lines()
    model = train_gemma_sentencepiece(lines, vocab_size, character_coverage=0.9995, max_sentence_length=16384)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.model"
    path.write_bytes(model)
    return path


# The demo model: Gemma 3 blocks at toy width. Six layers give the real 5 local : 1 global
# pattern; the window (32) is shorter than the long documents, so sliding attention really slides.
# The vision tower sees 64 px images in 8 px patches (64 patches), pooled 2x2 to 16 image tokens.
DEMO_TEXT = dict(hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4, num_kv_heads=2,
                 head_dim=16, sliding_window=32, query_pre_attn_scalar=16.0)
DEMO_VISION = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=64,
                   patch_size=8, num_channels=3, layer_norm_eps=1e-6)
DEMO_MM_TOKENS = 16


def demo_config(tokenizer_path: Path):
    """A T5Gemma2Config at the demo shapes, with the special ids read from the trained tokenizer."""
    from model.config import RopeConfig, T5Gemma2Config, TextConfig, VisionConfig

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = {piece: processor.piece_to_id(piece) for piece in (BOI, EOI, IMAGE)}
    for piece, piece_id in ids.items():
        if processor.id_to_piece(piece_id) != piece:  # piece_to_id answers unk for unknown pieces
            raise RuntimeError(f"demo tokenizer {tokenizer_path} has no {piece} piece")
    layers = DEMO_TEXT["num_layers"]
    rope = {"sliding_attention": RopeConfig(theta=10_000.0),
            "full_attention": RopeConfig(theta=1_000_000.0, scaling="linear", factor=8.0)}
    text = TextConfig(
        vocab_size=processor.get_piece_size(),
        layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)),
        rope=rope, rms_norm_eps=1e-6, final_logit_softcapping=None, **DEMO_TEXT,
    )
    return T5Gemma2Config(
        encoder=text, decoder=text, vision=VisionConfig(**DEMO_VISION), mm_tokens_per_image=DEMO_MM_TOKENS,
        image_token_id=ids[IMAGE], boi_token_id=ids[BOI], eoi_token_id=ids[EOI],
        pad_token_id=processor.pad_id(), bos_token_id=processor.bos_id(), eos_token_ids=(processor.eos_id(),),
    )


def preprocessor_config(image_size: int) -> dict:
    """preprocessor_config.json as Gemma 3 checkpoints ship it, at the demo image size."""
    return {
        "image_processor_type": "Gemma3ImageProcessor",
        "processor_class": "Gemma3Processor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": None,
        "do_pan_and_scan": None,
        "image_seq_length": DEMO_MM_TOKENS,
    }


def build_checkpoint(directory: Path, corpus: list[str], seed: int = SEED) -> Path:
    """Tokenizer trained on `corpus` + random weights, in the Hugging Face checkpoint layout."""
    import model

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_path = train_tokenizer(directory, corpus)
    config = demo_config(tokenizer_path)
    model.save_pretrained(model.random_model(config, seed=seed), directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(config.vision.image_size),
                                                                   indent=2) + "\n")
    return directory


# ---- dataset + checkpoint, together ----------------------------------------------------------


def image_count(rows: int) -> int:
    """Images scale with --rows: one per eight documents, at least 8 (five good, three bad)."""
    return max(8, rows // 8)


def sentence_count(rows: int) -> int:
    """Translate rows: one per five documents, at least 8."""
    return max(8, rows // 5)


def generate(out: Path, rows: int = DEFAULT_ROWS, seed: int = SEED) -> dict:
    """Write the demo dataset and checkpoint under `out`; return the manifest (also written there).

    Replaces any earlier data/ and checkpoint/ in `out`; touches nothing else.
    """
    out = Path(out).resolve()
    for name in (DATA_DIR, CHECKPOINT_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    documents = make_documents(rows, seed)
    sentences = make_sentences(sentence_count(rows), seed)
    images = make_images(image_count(rows), seed)
    data = out / DATA_DIR
    write_shards(documents, DOC_SCHEMA, data / "docs", DOC_SHARDS)
    write_shards(sentences, SENTENCE_SCHEMA, data / "sentences", SENTENCE_SHARDS)
    write_shards(images, IMAGE_SCHEMA, data / "images", IMAGE_SHARDS)
    corpus = [d["text"] for d in documents if d["text"]] + [i["drawn"] for i in images]
    build_checkpoint(out / CHECKPOINT_DIR, corpus, seed)
    manifest = {
        "rows": rows, "seed": seed,
        "datasets": {"docs": len(documents), "sentences": len(sentences), "images": len(images)},
        # The error kind each bad row should get (operators/columns.py ERROR_KINDS).
        "bad_rows": {
            "docs": {d["id"]: "text_missing" if d["text"] is None else "text_empty"
                     for d in documents if not d["text"]},
            "sentences": {s["id"]: "text_empty" for s in sentences if not s["text"]},
            "images": {i["id"]: BAD_IMAGE_ERRORS[i["id"]] for i in images if i["id"] in BAD_IMAGE_ERRORS},
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---- job files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoJob:
    """One demo job: which dataset it reads, which task it runs, where it writes."""

    name: str  # job file stem and output directory name
    dataset: str  # directory under OUT/data/
    task: dict  # the [[task]] table
    input_columns: dict  # the [input] column settings
    shown_columns: tuple[str, ...]  # input columns printed next to the output
    keep_columns: tuple[str, ...] = ()  # [output] keep_columns: input columns copied into the output

    @property
    def classify(self) -> bool:
        return self.task["kind"] == "classify"


# The labeling jobs' candidates. The demo documents are word salads about towns, schools, music and
# the seasons; with random weights the choice is arbitrary, but every row gets one of these.
DEMO_TOPICS = ("city life", "nature", "school", "music", "travel")

DEMO_JOBS = (
    DemoJob("summarize", "docs",
            {"kind": "summarize", "output_column": "summary"},
            {"id_column": "id", "text_column": "text"}, ("language", "text")),
    DemoJob("caption", "images",
            {"kind": "caption", "output_column": "caption"},
            {"id_column": "id", "image_column": "image"}, ("drawn",)),
    DemoJob("translate", "sentences",
            {"kind": "translate", "output_column": "translation",
             "source_language": "German", "target_language": "English"},
            {"id_column": "id", "text_column": "text"}, ("text",)),
    # Labeling: each candidate is scored by the model (its log-likelihood after the prompt), so
    # every good row gets exactly one label, with every candidate's probability beside it.
    DemoJob("classify-topics", "docs",
            {"kind": "classify", "output_column": "topic", "labels": list(DEMO_TOPICS),
             "prompt": "Which topic is this text about: {labels}?\n\n{text}\n\nTopic:"},
            {"id_column": "id", "text_column": "text"}, ("text",), keep_columns=("language",)),
    DemoJob("ask-images", "images",
            {"kind": "classify", "output_column": "has_circle", "labels": ["yes", "no"],
             "prompt": "{image} Is there a circle in this picture? Answer yes or no."},
            {"id_column": "id", "image_column": "image"}, ("drawn",), keep_columns=("drawn",)),
)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string is a valid TOML basic string (same escapes), and keeps non-ASCII as is.
    return json.dumps(str(value), ensure_ascii=False)


def _toml_table(header: str, values: dict) -> str:
    return "\n".join([header] + [f"{key} = {_toml_value(value)}" for key, value in values.items()])


def job_file_text(job: DemoJob, out: Path, max_new_tokens: int) -> str:
    """The TOML of one demo job, with absolute paths into `out`."""
    out = Path(out).resolve()
    tables = [
        f"# Written by `t5g2 demo`: the {job.name} demo job, on CPU with the random demo checkpoint.\n"
        f"# Run it again with: t5g2 run {out / JOBS_DIR / (job.name + '.toml')}",
        _toml_table("[model]", {"source": str(out / CHECKPOINT_DIR), "dtype": "float32"}),
        _toml_table("[input]", {"path": str(out / DATA_DIR / job.dataset / "*.parquet"), **job.input_columns}),
        _toml_table("[output]", {"path": str(out / OUTPUTS_DIR / job.name) + "/",
                                 **({"keep_columns": list(job.keep_columns)} if job.keep_columns else {})}),
        # A classify task generates nothing: it takes no max_new_tokens.
        _toml_table("[[task]]", {**job.task, **({} if job.classify else {"max_new_tokens": max_new_tokens})}),
        # One CPU actor (gpus_per_actor = 0): the demo machine may have 2 cores and no GPU, and
        # the other core reads and prepares rows meanwhile. Calls of 16 rows split a few hundred
        # rows into many batches, as a real job's millions are.
        _toml_table("[resources]", {"gpu_actors": 1, "gpus_per_actor": 0, "rows_per_call": 16,
                                    "max_batch_tokens": 8192}),
    ]
    return "\n\n".join(tables) + "\n"


def write_job_files(out: Path, max_new_tokens: int) -> dict[str, Path]:
    directory = Path(out).resolve() / JOBS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for job in DEMO_JOBS:
        path = directory / f"{job.name}.toml"
        path.write_text(job_file_text(job, out, max_new_tokens))
        paths[job.name] = path
    return paths


# ---- running ----------------------------------------------------------------------------------


def read_output(directory: Path) -> pa.Table:
    """All committed part files of a job's output directory, as one table."""
    from pipeline.commit import PART_PREFIX

    files = sorted(Path(directory).glob(f"{PART_PREFIX}*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet output under {directory}")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def _clip(value, width: int = 70) -> str:
    text = "null" if value is None else str(value).replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def show_rows(job: DemoJob, out: Path, shown: int = 4) -> None:
    """Print a few result rows and every error row of one job, next to their input."""
    from operators import columns

    output = read_output(Path(out) / OUTPUTS_DIR / job.name)
    inputs = {row["id"]: row for row in pq.read_table(Path(out) / DATA_DIR / job.dataset).to_pylist()}
    rows = sorted(output.to_pylist(), key=lambda row: row[columns.ID])
    errors = [row for row in rows if row[columns.ERROR_KIND]]
    results = [row for row in rows if not row[columns.ERROR_KIND]]
    task = columns.TaskColumns.of(job.task["output_column"])
    print(f"\n{job.name}: {len(rows)} output rows for {len(inputs)} input rows: "
          f"{len(results)} results, {len(errors)} errors. A few of them:")
    for row in results[:shown] + errors:
        source = inputs.get(row[columns.ID], {})
        print(f"  {row[columns.ID]}")
        for name in job.shown_columns:
            print(f"    {name:>12}: {_clip(source.get(name))}")
        for name in job.keep_columns:
            if name not in job.shown_columns:
                print(f"    {name:>12}: {_clip(row[name])} (kept)")
        if row[columns.ERROR_KIND]:
            print(f"    {'error':>12}: {row[columns.ERROR_KIND]}: {_clip(row[columns.ERROR_MESSAGE])}")
        elif job.classify:
            odds = ", ".join(f"{e['label']} {e['probability']:.2f}" for e in row[task.scores])
            print(f"    {task.text:>12}: {row[task.text]}  ({odds})")
        else:
            # Random weights often pick special or partial-byte tokens, which decode to nothing
            # or to U+FFFD; the token count shows the model did produce them.
            flags = f"; flags: {', '.join(row[task.flags])}" if row[task.flags] else ""
            how = f"({row[task.finish_reason]}, {row[task.output_tokens]} tokens{flags})"
            print(f"    {task.text:>12}: {_clip(json.dumps(row[task.text], ensure_ascii=False), 56)} {how}")


def show_dry_run(job_path: Path) -> dict:
    """Print the dry run of one job file (pipeline/dryrun.py): no Ray, no model weights."""
    from pipeline.dryrun import dry_run, summary
    from pipeline.spec import load_job

    result = dry_run(load_job(job_path))
    print(f"\n=== dry run: t5g2 run {job_path} --dry-run\n{summary(result)}")
    return result


def run_jobs(job_paths: dict[str, Path], out: Path, address: str | None = None) -> dict[str, dict]:
    """Run the demo jobs one after another; return each run report by job name."""
    from pipeline.run import run_job
    from pipeline.spec import load_job

    reports = {}
    for job in DEMO_JOBS:
        print(f"\n=== {job.name}: {job_paths[job.name]}")
        reports[job.name] = run_job(load_job(job_paths[job.name]), address=address)
    return reports


# ---- command line -----------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="t5g2 demo",
        description="Generate a small multilingual dataset and a random T5Gemma 2 checkpoint, then run "
                    "summarize, caption, translate and two labeling jobs on them with a local Ray. Nothing is "
                    "downloaded.",
    )
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"directory for the data, checkpoint, job files and outputs (default ./{DEFAULT_OUT})")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                        help=f"documents to generate; images are one per eight (default {DEFAULT_ROWS})")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"generation cap of every demo job (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the dataset and checkpoint already in --out instead of generating them")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: start a local Ray, or RAY_ADDRESS if set)")
    args = parser.parse_args(argv)
    if args.rows < 16:
        parser.error(f"--rows must be at least 16 so every dataset has good and bad rows, got {args.rows}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return args


def prepare(out: Path, rows: int, keep: bool) -> dict:
    """The dataset and checkpoint in `out`: reused with --keep when present, else generated."""
    manifest_path = out / MANIFEST
    if keep and manifest_path.exists() and (out / CHECKPOINT_DIR / "config.json").exists():
        manifest = json.loads(manifest_path.read_text())
        note = "" if manifest["rows"] == rows else f" (--rows {rows} ignored: --keep reuses what is there)"
        print(f"Reusing the demo dataset and checkpoint in {out}{note}")
        return manifest
    if keep:
        print(f"--keep: no complete demo dataset in {out} yet; generating one")
    started = time.perf_counter()
    manifest = generate(out, rows)
    sizes = ", ".join(f"{name} {count} rows" for name, count in manifest["datasets"].items())
    print(f"Generated the demo dataset ({sizes}) and checkpoint in {out} "
          f"in {time.perf_counter() - started:.1f}s")
    return manifest


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare(out, args.rows, args.keep)
    # Outputs are always rewritten: the demo shows a whole run, not a resume of an earlier one.
    shutil.rmtree(out / OUTPUTS_DIR, ignore_errors=True)
    job_paths = write_job_files(out, args.max_new_tokens)
    show_dry_run(job_paths[DEMO_JOBS[0].name])
    started = time.perf_counter()
    run_jobs(job_paths, out, address=args.address)
    for job in DEMO_JOBS:
        show_rows(job, out)
    print(f"\nDemo finished in {time.perf_counter() - started:.1f}s. The weights are random, so the text "
          f"is nonsense; every input row has exactly one output row, a result or an error.")
    print(f"Job files: {out / JOBS_DIR}   outputs: {out / OUTPUTS_DIR}")
    print("To run a real checkpoint, see README.md, \"Using a real checkpoint\".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
