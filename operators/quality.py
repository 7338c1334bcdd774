"""Quality flags on generated outputs: cheap per-output checks that mark results worth a look.

`output_flags(ids, text, finish_reason, language)` gives the names (columns.QUALITY_FLAGS) that one
generated sequence earns:

  repetition      its token ids hold a block repeated back to back (`repeats`)
  empty           its decoded text is empty or only whitespace
  max_new_tokens  it stopped at the length limit (finish reason "length")
  wrong_language  `language` (a detector code, for translate tasks) is set and the detector is
                  confident the text is in another language (`wrong_language`)

`detector_language(name)` turns a target_language as a job writes it ("German", "de", "pt-BR",
"Deutsch") into the detector's code, or None when the detector does not know that language (the
task then gets no language check). The detector is py3langid (a Naive Bayes model over byte
n-grams, 140 language codes, shipped inside the wheel: nothing is downloaded), loaded once per
process.
Names are resolved by langcodes (with language_data: English and native names, BCP 47 tags).
Why py3langid: on 60 sentences of 12 languages (docs/measure_quality_flags.py has 36 of them) it
got every long one right and 21 of 24 short ones, as lingua did, at 0.06 ms a sentence in 4.6 MB
installed, where lingua took 96 MB installed, 1 GB resident and 143 ms a sentence (its low-accuracy
mode: 136 MB resident, 17 of 24 short ones); pycld2 answers "unknown" for most short sentences.

Not here: the flag vocabulary (columns.QUALITY_FLAGS), writing the flags column (finish.py),
counting them (pipeline/report.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

# ---- repetition -----------------------------------------------------------------------------

# A looping decode repeats a block of tokens back to back until the length limit (or until it
# escapes the loop). The flag asks for a block of any length repeated at least REPEAT_MIN_TIMES
# times in a row, the run covering at least REPEAT_MIN_TOKENS tokens: a single token 16 times, a
# 5-token phrase 4 times, a 20-token sentence 3 times. Why back to back rather than "an n-gram
# occurs k times anywhere" (docs/measure_quality_flags.py): over 2577 windows of 64 to 256 words
# of real prose (Debian's licence texts, which repeat their phrases a lot, and Python docstrings),
# a 4-gram 4+ times anywhere tripped on 3.0% of them (5+ times: 1.2%, an 8-gram 3+ times: 0.8%),
# while this rule tripped on none; both catch synthetic loops (blocks of 1 to 45 words, starting
# anywhere, with room for 3 repeats): this one all of them, the counts 92 to 99%. What it does
# trip on: ruler lines and tables when a tokenizer splits them into many equal tokens (Gemma's
# vocabulary has single tokens for runs of "-", "=", spaces), and a list of 16 equal items.
REPEAT_MIN_TIMES = 3
REPEAT_MIN_TOKENS = 16
# Blocks up to this many tokens are looked for (a paragraph-long loop is longer, and rare): it
# bounds the cost, linear in the output's length: about 0.1 ms for 256 tokens, 1 ms for 2048.
REPEAT_MAX_BLOCK = 128


def repeats(ids: Sequence[int], min_times: int = REPEAT_MIN_TIMES, min_tokens: int = REPEAT_MIN_TOKENS,
            max_block: int = REPEAT_MAX_BLOCK) -> bool:
    """Whether some block of tokens (of any length p up to `max_block`) occurs `min_times` times back
    to back, the run covering at least `min_tokens` tokens. All lengths are checked at once:
    same[p - 1, i] says ids[i] == ids[i + p], and a run of k such positions in row p is a block of
    p tokens repeated (k + p) / p times."""
    a = np.asarray(ids, dtype=np.int64)
    n = len(a)
    longest = min(n // min_times, max_block)  # longer blocks cannot repeat min_times times
    if n < min_tokens or longest < 1:
        return False
    # Token ids are >= 0, so the -1 padding never equals one: positions past the end do not repeat.
    padded = np.concatenate([a, np.full(longest, -1, dtype=np.int64)])
    same = np.zeros((longest, n + 1), dtype=np.int8)  # a last column of 0 ends every row's last run
    same[:, :n] = np.lib.stride_tricks.sliding_window_view(padded, n)[1:longest + 1] == a
    edges = np.diff(same.ravel(), prepend=0)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    run, block = ends - starts, starts // (n + 1) + 1
    return bool(np.any((run + block >= min_times * block) & (run + block >= min_tokens)))


# ---- language ---------------------------------------------------------------------------------

# The detector is asked only about texts with at least this many letters (str.isalpha: CJK
# characters count): below that its guesses are noise ("Danke." or "OK" says little). A text is
# flagged when the detector gives the target language (with its siblings, below) a probability
# under LANGUAGE_MAX_PROBABILITY. Measured on 36 hand-written sentences of 12 languages (20+
# letters each): the right language got 0.75 or more, every other of the 12 at most 0.015, so
# the threshold is far from both; mixed-language text (half translated) keeps the flag off.
LANGUAGE_MIN_LETTERS = 20
LANGUAGE_MAX_PROBABILITY = 0.1
# The detector's codes that are one written language for this check: varieties it tells apart but
# a target language name does not (a Chinese translation scored as 'wuu' or 'yue' is still Chinese).
_SAME_LANGUAGE = ({"zh", "wuu", "yue"}, {"ar", "ary", "arz"}, {"no", "nn"}, {"sr", "hr", "bs"}, {"uz", "uzs"},
                  {"ku", "sdh"})
# langcodes' distance between the target's language and a detector code at most this: the same
# language under another code ('nb' -> 'no', 'fil' -> 'tl'), not a related one ('gsw' is not 'de').
_MAX_LANGUAGE_DISTANCE = 3


@functools.cache
def language_identifier():
    """py3langid's identifier with probabilities, loaded once per process (about a second: the
    model is a 4.5 MB xz file inside the package)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@functools.cache
def detector_language(name: str | None) -> str | None:
    """The detector's code for a target language given by name ("German", "Deutsch", "Brazilian
    Portuguese") or tag ("de", "deu", "pt-BR", "zh-Hant"); None when langcodes does not know the
    name or the detector does not know the language."""
    import langcodes

    name = (name or "").strip()
    if not name:
        return None
    try:
        tag = langcodes.get(name) if langcodes.tag_is_valid(name) else langcodes.find(name)
    except LookupError:
        return None
    # The language alone: the detector's codes carry no script or region ('zh' covers both scripts).
    labels = language_identifier().labels
    return langcodes.closest_supported_match(tag.language, labels, max_distance=_MAX_LANGUAGE_DISTANCE)


def language_probability(text: str, language: str) -> float:
    """The probability the detector gives `language` (with its siblings in _SAME_LANGUAGE) for `text`."""
    accepted = next((group for group in _SAME_LANGUAGE if language in group), {language})
    return sum(p for code, p in language_identifier().rank(text) if code in accepted)


def wrong_language(text: str, language: str) -> bool:
    """Whether the detector is confident `text` is not in `language` (a detector code); texts under
    LANGUAGE_MIN_LETTERS letters are never flagged."""
    if sum(ch.isalpha() for ch in text) < LANGUAGE_MIN_LETTERS:
        return False
    return language_probability(text, language) < LANGUAGE_MAX_PROBABILITY


# ---- all flags of one output ------------------------------------------------------------------

def output_flags(ids: Sequence[int], text: str, finish_reason: str | None, language: str | None = None) -> list[str]:
    """The QUALITY_FLAGS one generated sequence earns, in a fixed order (columns.QUALITY_FLAGS')."""
    flags = []
    if not text.strip():
        flags.append("empty")
    if finish_reason == "length":
        flags.append("max_new_tokens")
    if repeats(ids):
        flags.append("repetition")
    if language is not None and wrong_language(text, language):  # an empty text has too few letters to judge
        flags.append("wrong_language")
    return flags
