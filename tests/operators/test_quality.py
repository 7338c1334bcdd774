"""Quality flags: one vocabulary (columns.QUALITY_FLAGS, the README), the repetition rule on real
token ids (a trained SentencePiece model), and the language check with the shipped detector."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from helpers.spm import train_sentencepiece
from model.tokenizer import Tokenizer
from operators import columns as C
from operators import quality

REPO = Path(__file__).resolve().parents[2]

# Real summaries and translations of the kind the tasks write: nothing here repeats itself.
SUMMARIES = [
    "The report covers sales in 2024. Revenue grew by 12 percent, driven by exports to Asia, while costs "
    "rose more slowly. The company expects growth to continue next year but warns that higher interest "
    "rates and a weaker euro could slow demand. The board proposes a higher dividend.",
    "Der Bericht beschreibt die Umsätze im Jahr 2024. Der Umsatz stieg um zwölf Prozent, vor allem durch "
    "Exporte nach Asien, während die Kosten langsamer wuchsen. Das Unternehmen erwartet weiteres Wachstum, "
    "warnt aber vor höheren Zinsen und einem schwächeren Euro.",
    # A summary may say a phrase twice, even back to back, or a short word thrice: that is not a loop.
    "The city council approved the plan. The city council approved the budget, too, after a long debate "
    "about schools, roads and the new library near the station.",
    "Outside, protesters chanted no more cuts, no more cuts, until the vote. It was a long, long, long, cold night.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    train_sentencepiece(directory)  # 768 pieces: many tokens per word, a harsher test than Gemma's vocabulary
    return Tokenizer.from_pretrained(str(directory))


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode_one(text, add_bos=False)


def test_every_flag_is_declared_produced_and_documented():
    source = ast.parse((REPO / "operators" / "quality.py").read_text())
    produced = {node.args[0].value for node in ast.walk(source)
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "append"
                and node.args and isinstance(node.args[0], ast.Constant)}
    assert produced == set(C.QUALITY_FLAGS)
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Quality flags"):]
    section = section[:section.index("\n#", 1)]
    assert set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)) == set(C.QUALITY_FLAGS)
    for flag, meaning in C.QUALITY_FLAGS.items():
        assert len(meaning.split()) >= 4, flag


def test_real_text_is_not_flagged_as_repetition(tokenizer):
    for text in SUMMARIES:
        ids = encode(tokenizer, text)
        assert len(ids) > 2 * quality.REPEAT_MIN_TOKENS  # long enough that the rule had its chance
        assert not quality.repeats(ids), text
        assert quality.output_flags(ids + [tokenizer.eos_id], text, "eos") == []


def test_a_looping_decode_is_flagged(tokenizer):
    sentence = encode(tokenizer, " The company said that sales rose.")
    prefix = encode(tokenizer, SUMMARIES[0])[:40]
    loop = (prefix + sentence * 20)[:128]  # a sentence loop cut at max_new_tokens
    assert quality.repeats(loop)
    assert quality.output_flags(loop, tokenizer.decode_one(loop), "length") == ["max_new_tokens", "repetition"]
    dots = encode(tokenizer, "Summary: ") + [encode(tokenizer, "!")[0]] * 16
    assert quality.repeats(dots)
    # A loop the decode escaped, then a normal ending: still flagged.
    escaped = prefix + sentence * 4 + encode(tokenizer, " Then the meeting ended.")
    assert quality.repeats(escaped)
    # The thresholds: 15 equal tokens, or a block said only twice, are not a loop.
    assert not quality.repeats([7] * (quality.REPEAT_MIN_TOKENS - 1))
    assert not quality.repeats(prefix + sentence * 2)


def test_target_language_names_and_tags_map_to_the_detector():
    assert quality.detector_language("German") == quality.detector_language("de") == "de"
    assert quality.detector_language("Deutsch") == quality.detector_language(" deu ") == "de"
    assert quality.detector_language("english") == "en"
    assert quality.detector_language("Brazilian Portuguese") == quality.detector_language("pt-BR") == "pt"
    assert quality.detector_language("Chinese (Traditional)") == quality.detector_language("zh-Hant") == "zh"
    assert quality.detector_language("Norwegian Bokmål") == "no"  # the same language under another code
    for unknown in ("Klingon", "Elvish", "Old English", "Swiss German", ""):  # Swiss German is not German
        assert quality.detector_language(unknown) is None, unknown
    labels = set(quality.language_identifier().labels)
    assert all(group <= labels for group in quality._SAME_LANGUAGE)


def test_the_language_check_flags_confident_mismatches_only():
    german = "Der Ausschuss hat den neuen Haushalt nach einer langen Debatte am Dienstag genehmigt."
    english = "The committee approved the new budget after a long debate on Tuesday."
    french = "Le comité a approuvé le nouveau budget après un long débat mardi."
    assert not quality.wrong_language(german, "de") and not quality.wrong_language(english, "en")
    assert quality.wrong_language(english, "de") and quality.wrong_language(french, "de")
    assert quality.wrong_language(german, "en")
    # Too short to judge: never flagged, whatever the language.
    assert not quality.wrong_language("Vielen Dank.", "en")
    # Varieties the detector tells apart count as the target: Nynorsk for Norwegian, Croatian-looking
    # Latin Serbian for Serbian.
    assert not quality.wrong_language("Eg veit ikkje kva du meiner, men eg trur at det er rett å gå heim no.", "no")
    assert not quality.wrong_language("Vlada je u utorak odobrila novi proračun nakon duge rasprave u saboru.", "sr")
    assert quality.output_flags([5, 6], english, "eos", "de") == ["wrong_language"]
    assert quality.output_flags([5, 6], english, "eos", None) == []
    assert quality.output_flags([1], " \n", "eos", "de") == ["empty"]  # empty, not also a wrong language
