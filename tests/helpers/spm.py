"""Train a small, real SentencePiece model laid out like Gemma 3's tokenizer.model.

`train_sentencepiece(dir)` writes `dir/tokenizer.model` in well under a second and returns its path.
The model is trained on a fixed multilingual corpus with Gemma's settings (jobs.demo's recipe) (BPE, byte fallback, no
dummy prefix, identity normalization, whitespace kept, split digits) and Gemma's special-id layout:
pad=0, eos=1, bos=2, unk=3, `<mask>` as a control symbol, then the chat-turn and image markers as
user-defined symbols. Training is deterministic: the same arguments give the same bytes.

Not here: checkpoint config.json or weights (each test writes those for the ids it needs; use
`special_token_ids` to read the ids back from the trained model).
"""

from __future__ import annotations

import os

import sentencepiece as spm

# One training recipe for the demo and the tests (Gemma 3's settings).
from jobs.demo import BOI, EOI, IMAGE, train_gemma_sentencepiece

# Several scripts, digits, punctuation, whitespace runs and newlines: enough for merges in every
# script and for whitespace-only pieces ("\n\n", runs of "▁"), as Gemma's vocabulary has.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n\nA second paragraph follows the first one.",
    "Summarize the following document in three sentences: the report covers sales in 2024.",
    "Caption this image. A photo of a cat sitting on a red chair near the window.",
    "Translate from English to German: The weather is nice today and the sun is shining.",
    "Das Wetter ist heute schön und die Sonne scheint über der Stadt.",
    "Le renard brun rapide saute par-dessus le chien paresseux. C'est l'été à Paris.",
    "El zorro marrón rápido salta sobre el perro perezoso. ¿Dónde está la biblioteca?",
    "Быстрая коричневая лиса прыгает через ленивую собаку. Привет, мир! Как дела?",
    "敏捷的棕色狐狸跳过了懒狗。你好，世界！这是一个测试。我们今天去公园散步。",
    "素早い茶色の狐がのろまな犬を飛び越える。こんにちは世界。東京は大きな都市です。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘습니다. 안녕하세요 세계.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول. مرحبا بالعالم، كيف حالك اليوم؟",
    "השועל החום המהיר קופץ מעל הכלב העצלן. שלום עולם.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है। नमस्ते दुनिया।",
    "def main():\n    for i in range(10):\n        print(i * 2)\n\n    return 0",
    "    indented   text\twith\ttabs and  double  spaces   and trailing spaces   ",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, 3.14159, 2,718, 1e-6, 100% of 42 items cost $19.99.",
    "Emoji are rare here 😀 but accents are common: café, naïve, façade, São Paulo, Zürich.",
]


def train_sentencepiece(
    directory: str | os.PathLike,
    vocab_size: int = 768,
    *,
    image_soft_token: bool = True,
    filename: str = "tokenizer.model",
) -> str:
    """Train a Gemma-like BPE SentencePiece model into `directory/filename`; return its path.

    `image_soft_token=False` leaves `<image_soft_token>` out of the pieces, as in Gemma 3's own
    tokenizer.model, where that token is an added token whose id comes from config.json.
    `vocab_size` must be at least 512 (256 byte pieces, ~240 characters, the special pieces); it is
    an upper bound: the corpus is small, so the trainer may stop a little short of it.
    """
    model = train_gemma_sentencepiece(_CORPUS * 8, vocab_size, image_soft_token=image_soft_token,
                                      # Leaves the rarest characters to byte fallback.
                                      character_coverage=0.99, max_sentence_length=4096)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), filename)
    with open(path, "wb") as handle:
        handle.write(model)
    return path


def special_token_ids(model_path: str | os.PathLike) -> dict[str, int]:
    """Ids of the special pieces in a trained model (absent pieces are left out).

    Keys: pad, eos, bos, unk, boi, eoi, image, piece_count. Handy for writing config.json.
    """
    processor = spm.SentencePieceProcessor(model_file=os.fspath(model_path))
    ids = {
        "pad": processor.pad_id(),
        "eos": processor.eos_id(),
        "bos": processor.bos_id(),
        "unk": processor.unk_id(),
        "piece_count": processor.get_piece_size(),
    }
    for key, piece in (("boi", BOI), ("eoi", EOI), ("image", IMAGE)):
        piece_id = processor.piece_to_id(piece)
        if processor.id_to_piece(piece_id) == piece:
            ids[key] = piece_id
    return ids
