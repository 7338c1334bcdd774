"""Long texts in pieces (input.long_input = "chunk"): where a text is cut, and how the pieces' outputs are
joined into the next prompts (map-reduce). Plain functions over strings and token ids.

Cutting (prepare): `text_units(text)` cuts a text at its boundaries, each unit starting with the
whitespace before it (so that "First. Second." is "First." + " Second.", as SentencePiece reads
" Second" anyway): a paragraph boundary is a whitespace run with a blank line in it, a sentence
boundary a whitespace run after ".", "!", "?", "…", "。", "！" or "？" (closing quotes and brackets allowed between),
a line break, or the point right after "。", "！", "？". `split_pieces(units' ids, levels, budget)`
then makes the pieces: every paragraph that fits the budget is one part; a paragraph that does not
is replaced by its sentences, and a sentence that does not by runs of `budget` tokens (never cut
between the bytes of one character); consecutive parts are packed into a piece while they fit. So
a piece is cut inside a paragraph only when the paragraph cannot fit in one piece, and inside a
sentence only when the sentence cannot. The units are tokenized one by one: the pieces, concatenated,
are the text's token ids (it decodes back to the text), and they may differ from tokenizing the
whole text at once only at a unit's first token.

Joining (infer): a `Frame` is the task's prompt around its {text} as token ids (prefix, BOS included;
suffix), the separator ids put between two outputs ("\n\n") and the prompt limit, so that the actor builds prompts
of outputs without a tokenizer: `frame.wrap(parts)` = prefix + parts joined by the separator +
suffix. `group_outputs(outputs, frame)` packs consecutive outputs into groups whose prompt
fits the limit; None when no two of them fit together (the outputs could never be merged into one).

Not here: the row loop and error kinds (prepare.py), running the requests (infer.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SENTENCE, PARAGRAPH = 1, 2  # the level of the boundary a unit starts at (the first unit: PARAGRAPH)
SEPARATOR = "\n\n"  # between two outputs joined into one prompt
MAX_CHUNKS = 256  # pieces per text at most: a longer text is a text_too_long row (prepare.py)

_SPACE = re.compile(r"\s+")
_SENTENCE_END = frozenset(".!?…。！？")
_CLOSERS = "\"')]}»”’"  # may stand between a sentence's end mark and the space after it
_CJK_END = re.compile(r"[。！？]+")  # end a sentence with no space after them


def _ends_sentence(text: str, end: int) -> bool:
    """Whether text[:end] ends with a sentence mark, closing quotes or brackets allowed after it."""
    head = text[max(0, end - 8):end].rstrip(_CLOSERS)
    return bool(head) and head[-1] in _SENTENCE_END


def text_units(text: str) -> list[tuple[str, int]]:
    """The text cut at its sentence and paragraph boundaries: [(unit, level of the boundary it starts at)].
    The units joined give the text back."""
    cuts: dict[int, int] = {}
    for match in _SPACE.finditer(text):
        start, run = match.start(), match.group()
        if start == 0 or match.end() == len(text):
            continue  # leading and trailing whitespace stays with its neighbour
        if run.count("\n") >= 2:
            cuts[start] = PARAGRAPH
        elif "\n" in run or _ends_sentence(text, start):
            cuts[start] = SENTENCE
    for match in _CJK_END.finditer(text):
        at = match.end()
        if 0 < at < len(text) and not text[at].isspace():
            cuts.setdefault(at, SENTENCE)
    bounds = sorted(cuts)
    starts = [0, *bounds]
    ends = [*bounds, len(text)]
    levels = [PARAGRAPH, *(cuts[b] for b in bounds)]
    return [(text[a:b], level) for a, b, level in zip(starts, ends, levels)]


def split_pieces(unit_ids: Sequence[Sequence[int]], levels: Sequence[int], budget: int,
                 continues_char: Callable[[int], bool] = lambda token: False) -> list[list[int]]:
    """The units' token ids cut into pieces of at most `budget` tokens (see the module docstring).

    `levels[i]` is the level of the boundary unit i starts at (text_units); `continues_char(id)` says
    whether a token is a byte-fallback piece that continues a character (never cut before one).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    parts: list[list[int]] = []
    paragraph: list[int] = []  # unit indices of the current paragraph

    def flush():
        ids = [t for u in paragraph for t in unit_ids[u]]
        if len(ids) <= budget:
            parts.append(ids)
            return
        for u in paragraph:  # the paragraph cannot be one piece: its sentences are the parts
            sentence = list(unit_ids[u])
            if len(sentence) <= budget:
                parts.append(sentence)
            else:
                parts.extend(_token_runs(sentence, budget, continues_char))

    for u, level in enumerate(levels):
        if level >= PARAGRAPH and paragraph:
            flush()
            paragraph = []
        paragraph.append(u)
    if paragraph:
        flush()
    pieces: list[list[int]] = []
    for part in parts:
        if not part:
            continue
        if pieces and len(pieces[-1]) + len(part) <= budget:
            pieces[-1].extend(part)
        else:
            pieces.append(list(part))
    return pieces


def _token_runs(ids: list[int], budget: int, continues_char: Callable[[int], bool]) -> list[list[int]]:
    """ids cut into runs of at most `budget` tokens, a cut moved back (at most 3 tokens: a UTF-8
    character has at most 4 bytes) rather than made before a token that continues a character."""
    runs, start = [], 0
    while start < len(ids):
        end = min(start + budget, len(ids))
        if end < len(ids):
            back = end  # the next run starts at ids[back]: not in the middle of a character
            while back > start + 1 and end - back < 3 and continues_char(ids[back]):
                back -= 1
            if not continues_char(ids[back]):
                end = back
        runs.append(ids[start:end])
        start = end
    return runs


@dataclass(frozen=True)
class Frame:
    """A task's prompt around its {text}, as token ids: what a prompt of joined outputs is built from."""

    prefix: tuple[int, ...]  # the prompt's ids before {text} (BOS first)
    separator: tuple[int, ...]  # between two joined outputs (SEPARATOR tokenized)
    suffix: tuple[int, ...]  # the prompt's ids after {text}
    limit: int  # the longest prompt allowed (input.max_input_tokens)

    def wrap(self, parts: Sequence[Sequence[int]]) -> list[int]:
        """prefix + the parts joined by the separator + suffix."""
        ids = list(self.prefix)
        for n, part in enumerate(parts):
            if n:
                ids.extend(self.separator)
            ids.extend(part)
        return ids + list(self.suffix)

    def length(self, sizes: Sequence[int]) -> int:
        """len(wrap(parts)) for parts of these sizes."""
        return len(self.prefix) + len(self.suffix) + sum(sizes) + len(self.separator) * max(0, len(sizes) - 1)

    def to_row(self) -> dict:
        """As the internal column stores it (columns.CHUNK_FRAME_TYPE)."""
        return {"prefix": list(self.prefix), "separator": list(self.separator), "suffix": list(self.suffix),
                "limit": self.limit}

    @classmethod
    def from_row(cls, row: dict) -> Frame:
        return cls(tuple(row["prefix"]), tuple(row["separator"]), tuple(row["suffix"]), int(row["limit"]))


def group_outputs(outputs: Sequence[Sequence[int]], frame: Frame) -> list[list[int]] | None:
    """Consecutive outputs (their indices) packed into groups whose wrapped prompt fits frame.limit tokens;
    None when that makes no progress: an output that does not fit alone, or as many groups as outputs
    (no two fit together), so joining again could never end in one prompt."""
    groups: list[list[int]] = []
    sizes: list[int] = []
    for i, output in enumerate(outputs):
        if groups and frame.length([*sizes, len(output)]) <= frame.limit:
            groups[-1].append(i)
            sizes.append(len(output))
            continue
        if frame.length([len(output)]) > frame.limit:
            return None
        groups.append([i])
        sizes = [len(output)]
    if len(outputs) > 1 and len(groups) == len(outputs):
        return None
    return groups
