"""Where the quality flags' thresholds come from (operators/quality.py): a measurement, not a test.

Repetition: windows of 64, 128 and 256 words of real prose (Debian's licence texts under
/usr/share/common-licenses, which repeat their phrases a lot, and the docstrings of 20 standard
library modules), words and punctuation as tokens (close to Gemma's ~1.3 tokens a word), against
synthetic loops (a natural prefix, then a block of 1 to 45 words repeated to the window's end).
Windows whose most frequent 4-gram is punctuation (ruler lines, split into one token per
character here but few tokens in Gemma's vocabulary) are counted apart. For each rule: how many
prose windows trip it, and how many loops with room for 3 repeats it catches.

Language: the probability py3langid gives the right language and the best other one of 12, over
three sentences per language.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python docs/measure_quality_flags.py
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections import Counter
from pathlib import Path

from operators import quality

LICENCES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1")
MODULES = ("os", "inspect", "collections", "argparse", "json", "subprocess", "threading", "asyncio", "email",
           "http.client", "logging", "pathlib", "shutil", "tarfile", "zipfile", "unittest", "typing", "dataclasses",
           "functools", "itertools")

SENTENCES = {
    "en": ["The weather was cold, so we stayed inside and read books all afternoon.",
           "The committee approved the new budget after a long debate on Tuesday.",
           "Please send me the report before the meeting tomorrow morning."],
    "de": ["Das Wetter war kalt, also blieben wir drinnen und lasen den ganzen Nachmittag Bücher.",
           "Der Ausschuss hat den neuen Haushalt nach einer langen Debatte am Dienstag genehmigt.",
           "Bitte schicken Sie mir den Bericht vor der Besprechung morgen früh."],
    "fr": ["Il faisait froid, alors nous sommes restés à l'intérieur à lire tout l'après-midi.",
           "Le comité a approuvé le nouveau budget après un long débat mardi.",
           "Veuillez m'envoyer le rapport avant la réunion de demain matin."],
    "es": ["Hacía frío, así que nos quedamos dentro leyendo libros toda la tarde.",
           "El comité aprobó el nuevo presupuesto después de un largo debate el martes.",
           "Por favor, envíame el informe antes de la reunión de mañana por la mañana."],
    "it": ["Faceva freddo, quindi siamo rimasti dentro a leggere libri tutto il pomeriggio.",
           "Il comitato ha approvato il nuovo bilancio dopo un lungo dibattito martedì.",
           "Per favore, mandami il rapporto prima della riunione di domani mattina."],
    "pt": ["Estava frio, então ficamos dentro de casa lendo livros a tarde toda.",
           "O comitê aprovou o novo orçamento depois de um longo debate na terça-feira.",
           "Por favor, envie-me o relatório antes da reunião de amanhã de manhã."],
    "nl": ["Het was koud, dus we bleven binnen en lazen de hele middag boeken.",
           "De commissie keurde de nieuwe begroting goed na een lang debat op dinsdag.",
           "Stuur me alstublieft het rapport voor de vergadering morgenochtend."],
    "ru": ["Было холодно, поэтому мы остались дома и весь день читали книги.",
           "Комитет одобрил новый бюджет после долгих дебатов во вторник.",
           "Пожалуйста, пришлите мне отчёт до завтрашней утренней встречи."],
    "pl": ["Było zimno, więc zostaliśmy w domu i czytaliśmy książki przez całe popołudnie.",
           "Komisja zatwierdziła nowy budżet po długiej debacie we wtorek.",
           "Proszę przesłać mi raport przed jutrzejszym porannym spotkaniem."],
    "sv": ["Det var kallt, så vi stannade inne och läste böcker hela eftermiddagen.",
           "Kommittén godkände den nya budgeten efter en lång debatt i tisdags.",
           "Skicka mig rapporten före mötet i morgon bitti."],
    "zh": ["天气很冷，所以我们整个下午都待在家里看书。", "委员会在星期二经过长时间辩论后批准了新预算。",
           "请在明天早上开会之前把报告发给我。"],
    "ja": ["寒かったので、私たちは午後ずっと家の中で本を読んでいました。",
           "委員会は火曜日の長い議論の末、新しい予算を承認した。", "明日の朝の会議の前に報告書を送ってください。"],
}


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def max_ngram_count(tokens: list, n: int) -> int:
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return max(counts.values(), default=0)


def corpus() -> list[list[str]]:
    texts = [(Path("/usr/share/common-licenses") / name).read_text(errors="ignore") for name in LICENCES]
    docs = {inspect.getdoc(obj) for m in MODULES for obj in vars(importlib.import_module(m)).values()}
    return [words(t) for t in texts + sorted(d for d in docs if d and len(d) > 300)]


def measure_repetition() -> None:
    random.seed(0)
    texts = corpus()
    long_texts = [w for w in texts if len(w) > 400]
    prose, rulers, loops = [], [], []
    for length in (64, 128, 256):
        for w in texts:
            for start in range(0, max(1, len(w) - length), length // 2):
                window = w[start:start + length]
                if len(window) < 40:
                    continue
                top, times = Counter(tuple(window[j:j + 4]) for j in range(len(window) - 3)).most_common(1)[0]
                (rulers if times > 2 and not any(re.match(r"\w", x) for x in top) else prose).append(window)
        for _ in range(300):
            w = random.choice(long_texts)
            block, at = random.choice([1, 2, 3, 5, 8, 13, 20, 30, 45]), int(length * random.choice([0, .25, .5, .75]))
            s = random.randrange(0, len(w) - 400)
            if length - at >= 3 * block:  # room for 3 repeats
                loops.append((w[s:s + at] + w[s + at:s + at + block] * (length // block + 1))[:length])
    vocab: dict[str, int] = {}
    ids = lambda w: [vocab.setdefault(x, len(vocab)) for x in w]  # noqa: E731
    rules = {f"a {n}-gram {t}+ times anywhere": lambda w, n=n, t=t: max_ngram_count(w, n) >= t
             for n, t in ((4, 4), (4, 5), (6, 4), (8, 3))}
    rules["quality.repeats (back to back)"] = lambda w: quality.repeats(ids(w))
    print(f"repetition: {len(prose)} prose windows, {len(rulers)} ruler-line windows, {len(loops)} loops")
    for name, rule in rules.items():
        print(f"  {name:32} prose {sum(map(rule, prose)) / len(prose):6.2%}  rulers "
              f"{sum(map(rule, rulers)) / len(rulers):6.2%}  loops caught {sum(map(rule, loops)) / len(loops):6.1%}")


def measure_language() -> None:
    identifier = quality.language_identifier()
    right, other = [], []
    for language, sentences in SENTENCES.items():
        for sentence in sentences:
            p = dict(identifier.rank(sentence))
            right.append(p[language])
            other.append(max(p[code] for code in SENTENCES if code != language))
    print(f"language: {len(right)} sentences; right language p >= {min(right):.3f}, best other p <= {max(other):.3f} "
          f"(flag below {quality.LANGUAGE_MAX_PROBABILITY})")


if __name__ == "__main__":
    measure_repetition()
    measure_language()
