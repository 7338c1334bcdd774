"""Gemma 3 tokenizer for T5Gemma 2: text <-> ids, special ids, image placeholders.

Wraps the checkpoint's `tokenizer.model` (SentencePiece, loaded from bytes, so it can live on any
filesystem), or, when a checkpoint has none, its `tokenizer.json` (the `tokenizers` library, as
transformers' save_pretrained writes it), and produces the same ids as transformers' Gemma
tokenizer on the same files and the Gemma 3 processor. tokenizer.model is preferred when both are
present; `Tokenizer.file` says which was read. With tokenizer.model:

  * Encoding: the text is split at special-token strings (control pieces such as `<bos>`, the
    unknown piece, and the image markers), each of which becomes its single id, as transformers
    matches its added tokens in raw text. The text between them goes through SentencePiece
    unchanged (Gemma's model has identity normalization, no dummy prefix and byte fallback; a
    model that rewrites text is rejected at load). `add_bos` prepends `<bos>`; no `<eos>` is added.
  * Decoding: pieces are joined with "▁" read as a space; runs of byte pieces are joined into UTF-8,
    and a run that is not valid UTF-8 becomes one U+FFFD per byte, as the reference decoder does.
    `skip_special_tokens` drops control pieces (`<pad>`, `<eos>`, `<bos>`, ...), `<unk>` and the
    image markers; user-defined pieces such as `<start_of_turn>` are text and are kept, as
    transformers does for a tokenizer built from this tokenizer.model.
  * Images: `encode_prompt(text, num_images)` replaces each `<start_of_image>` in the text by
    "\\n\\n<start_of_image>" + mm_tokens_per_image x `<image_soft_token>` + "<end_of_image>\\n\\n" and
    encodes the result: exactly what `Gemma3Processor` feeds the model. With no text (None or "")
    and images, the text is the image markers joined by single spaces, the processor's rule when it
    gets images without text.

With tokenizer.json, the `tokenizers` library encodes and decodes the text itself, exactly as
transformers does with that file (its added tokens matched in raw text, its normalizer, byte
fallback and decoder; its truncation and padding settings off); pad/eos/bos/unk are the tokens
tokenizer_config.json names (special_tokens_map.json over it, as transformers reads it when
tokenizer_config.json has no added_tokens_decoder; Gemma's names for tokens neither names).
Prompts, image expansion and `add_bos` / `add_eos` are the same code for both files, so a
tokenizer.json converted from a tokenizer.model gives identical prompt ids.

Special ids come from the checkpoint: pad/eos/bos/unk from the SentencePiece model (or
tokenizer_config.json), the image markers by piece name. Gemma 3's own tokenizer.model has no
`<image_soft_token>` piece: it is an added token, either past the pieces (Gemma 3: 262144) or a
renamed reserved slot (T5Gemma 2 configs say 256001, where Gemma's model has `<unused99>`). Then
the id comes from config.json's image_token_index, and the marker text maps to it. Every id
config.json states is cross-checked against the model, and a mismatch fails at load.

Not here: chat templates and task prompts (pipeline/tasks.py), image pixels (images.py).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sentencepiece
import tokenizers

from .source import CheckpointError, CheckpointSource

TOKENIZER_FILE = "tokenizer.model"  # SentencePiece: preferred when present
TOKENIZER_JSON = "tokenizer.json"  # the `tokenizers` library's file: read when tokenizer.model is absent
TOKENIZER_CONFIG = "tokenizer_config.json"  # names the special tokens of tokenizer.json
SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # older transformers' place for the same names
CONFIG_FILE = "config.json"
# The names Gemma's tokenizer gives its special tokens, where tokenizer_config.json names none.
_GEMMA_SPECIAL_NAMES = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}

BOI_TOKEN = "<start_of_image>"  # marks an image in a prompt; begins the expanded image span
EOI_TOKEN = "<end_of_image>"  # ends the expanded image span
IMAGE_TOKEN = "<image_soft_token>"  # placeholder replaced by one projected vision feature

# A byte-fallback piece, as both SentencePiece and the reference decoder spell it.
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Round-trips unchanged only under Gemma's settings: identity normalization (NFKC would turn the
# ligature into "fi"), no dummy prefix, no whitespace collapsing, and byte fallback for rare text.
_NORMALIZATION_PROBE = "  a  b\t\n ﬁ \u0301 𝔸  "


def _trie_pattern(strings: Iterable[str]) -> str:
    """A regex matching any of `strings`, longest first where one extends another.

    Built as a trie, so a position costs one branch per character rather than one try per string:
    Gemma's vocabulary may hold thousands of control pieces, and documents many "<".
    """
    trie: dict = {}
    for text in strings:
        node = trie
        for char in text:
            node = node.setdefault(char, {})
        node[""] = {}  # a string ends here

    def build(node: dict) -> str:
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        ends_here = "" in node
        if len(branches) == 1 and not ends_here:
            return branches[0]
        # Greedy "?" tries the longer continuations first and falls back to ending here.
        return "(?:" + "|".join(branches) + ")" + ("?" if ends_here else "")

    return build(trie)


class PromptError(ValueError):
    """A prompt and its images do not fit together (count of image markers, literal image tokens)."""

    kind = "prompt_images"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the model and the pipeline treat specially; None where absent."""

    pad: int  # padding
    eos: int  # end of sequence
    bos: int  # beginning of sequence, prepended by encode(add_bos=True)
    unk: int  # unknown piece
    boi: int | None  # <start_of_image>
    eoi: int | None  # <end_of_image>
    image: int | None  # <image_soft_token>: one per vision feature
    mm_tokens_per_image: int | None  # image tokens per image (config.json encoder.mm_tokens_per_image)

    def __post_init__(self):
        for name in ("pad", "eos", "bos", "unk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise CheckpointError(
                    f"the tokenizer defines no {name} token (id {value}); use Gemma's tokenizer.model or tokenizer.json"
                )
        if self.mm_tokens_per_image is not None and self.mm_tokens_per_image <= 0:
            raise CheckpointError(f"mm_tokens_per_image must be positive, got {self.mm_tokens_per_image}")


# ---- the two vocabularies: what differs between tokenizer.model and tokenizer.json -------------


class _SentencePieceVocab:
    """tokenizer.model: SentencePiece encodes the text between special strings; decoding is ours."""

    file = TOKENIZER_FILE

    def __init__(self, model_proto: bytes, description: str):
        self.description = description
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise CheckpointError(
                f"{description} is not a usable SentencePiece model ({type(exc).__name__}: {exc}); "
                f"restore tokenizer.model from the original checkpoint"
            ) from exc
        sp = self._sp
        self.piece_count = sp.get_piece_size()
        self._check_normalization()
        # One pass over the vocabulary (262,144 pieces for Gemma 3) builds every table below.
        self.pieces: list[str] = [sp.id_to_piece(i) for i in range(self.piece_count)]
        control = [i for i in range(self.piece_count) if sp.is_control(i) or sp.is_unknown(i)]
        self.pad, self.eos, self.bos, self.unk = sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()
        # Strings matched in raw text as one id each, as the reference matches its added tokens.
        # User-defined pieces need no entry: SentencePiece already emits them whole.
        self.raw_specials: dict[str, int] = {self.pieces[i]: i for i in control}
        self.control = frozenset(control)  # dropped by decode with skip_special_tokens
        self._byte_value: dict[int, int] = {}
        for i, piece in enumerate(self.pieces):
            match = _BYTE_PIECE.match(piece)
            if match and sp.is_byte(i):
                self._byte_value[i] = int(match.group(1), 16)

    def _check_normalization(self) -> None:
        # Splitting text at special strings and encoding the chunks apart equals the reference only
        # when SentencePiece leaves text as is: spaces become "▁" and nothing else changes.
        sp = self._sp
        normalized = sp.normalize(_NORMALIZATION_PROBE)
        roundtrip = sp.decode(sp.encode(_NORMALIZATION_PROBE))
        if normalized != _NORMALIZATION_PROBE.replace(" ", "\u2581") or roundtrip != _NORMALIZATION_PROBE:
            raise CheckpointError(
                f"{self.description} rewrites text ({_NORMALIZATION_PROBE!r} normalizes to {normalized!r}, decodes "
                f"back as {roundtrip!r}): it applies Unicode normalization, a dummy prefix or whitespace "
                f"collapsing, or lacks byte fallback. This tokenizer implements Gemma's SentencePiece settings "
                f"only; use the checkpoint's Gemma tokenizer.model"
            )

    def piece(self, token_id: int) -> str | None:
        return self.pieces[token_id] if 0 <= token_id < self.piece_count else None

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self._sp.piece_to_id(piece)
        return token_id if self._sp.id_to_piece(token_id) == piece else None

    def matches_itself(self, text: str, token_id: int) -> bool:
        return False  # every image marker is split out before SentencePiece sees the text

    def is_reserved(self, token_id: int) -> bool:
        sp = self._sp
        piece = sp.id_to_piece(token_id)
        return bool(
            sp.is_control(token_id) or sp.is_unused(token_id) or re.fullmatch(r"<[A-Za-z0-9_\-\[\]]+>", piece)
        ) and not sp.is_byte(token_id)

    def encode(self, chunks: list[str]) -> list[list[int]]:
        return self._sp.encode(chunks) if chunks else []

    def decode(self, ids: Sequence[int], skip: frozenset[int], added: dict[int, str]) -> str:
        """Pieces joined with "▁" read as a space; byte runs as UTF-8 (one U+FFFD per byte when invalid)."""
        parts: list[str] = []
        run = bytearray()  # consecutive byte pieces, decoded together

        def flush():
            if run:
                try:
                    parts.append(run.decode("utf-8"))
                except UnicodeDecodeError:
                    # One replacement character per byte: the reference's rule, not Python's.
                    parts.append("\ufffd" * len(run))
                run.clear()

        for token_id in ids:
            if token_id in skip:
                continue  # skipped ids do not break a byte run, as in the reference
            byte = self._byte_value.get(token_id)
            if byte is not None:
                run.append(byte)
                continue
            flush()
            text = added.get(token_id)
            parts.append(text if text is not None else self.pieces[token_id].replace("\u2581", " "))
        flush()
        return "".join(parts)


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class _TokenizersVocab:
    """tokenizer.json: the `tokenizers` library encodes and decodes, as transformers does with the file."""

    file = TOKENIZER_JSON

    def __init__(self, tokenizer_json: str | bytes, special_names: dict[str, Any], description: str):
        """`special_names`: the special token names of tokenizer_config.json (and special_tokens_map.json)."""
        self.description = description
        text = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
        try:
            self._tk = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises its own Exception subclass on a bad file
            raise CheckpointError(
                f"{description} is not a usable tokenizer.json ({type(exc).__name__}: {exc}); restore it from "
                f"the original checkpoint, or re-save it with transformers' save_pretrained"
            ) from exc
        tk = self._tk
        # Ids are whole prompts' ids: the file's truncation and padding settings must not cut or pad them.
        tk.no_truncation()
        tk.no_padding()
        vocab = tk.get_vocab(with_added_tokens=True)
        self.piece_count = max(vocab.values()) + 1 if vocab else 0
        self._added = {token.content: token_id for token_id, token in tk.get_added_tokens_decoder().items()}
        ids = {}
        for name, default in _GEMMA_SPECIAL_NAMES.items():
            key = f"{name}_token"
            content = _token_content(special_names.get(key)) or default
            token_id = tk.token_to_id(content)
            if token_id is None:
                named = (f"which {TOKENIZER_CONFIG} names as {key}" if special_names.get(key) else
                         f"Gemma's {key} ({TOKENIZER_CONFIG} names none)")
                raise CheckpointError(f"{description} has no token {content!r}, {named}; use the tokenizer files of "
                                      f"one checkpoint")
            ids[name] = token_id
        self.pad, self.eos, self.bos, self.unk = ids["pad"], ids["eos"], ids["bos"], ids["unk"]
        for key, ours in (("boi_token", BOI_TOKEN), ("eoi_token", EOI_TOKEN), ("image_token", IMAGE_TOKEN)):
            named = _token_content(special_names.get(key))
            if named is not None and named != ours:
                raise CheckpointError(
                    f"{TOKENIZER_CONFIG} names {key} {named!r}; T5Gemma 2 prompts use {ours!r} (Gemma 3's image "
                    f"markers). Use the checkpoint's own tokenizer files"
                )
        self.raw_specials: dict[str, int] = {}  # the library matches its added tokens itself
        self.control = frozenset()  # the library's decode drops its own special tokens

    def piece(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id) if token_id >= 0 else None

    def piece_to_id(self, piece: str) -> int | None:
        return self._tk.token_to_id(piece)

    def matches_itself(self, text: str, token_id: int) -> bool:
        """The library matches `text` in raw text as `token_id` (one of its added tokens)."""
        return self._added.get(text) == token_id

    def is_reserved(self, token_id: int) -> bool:
        piece = self.piece(token_id)
        return piece is not None and bool(re.fullmatch(r"<[A-Za-z0-9_\-\[\]]+>", piece)) \
            and not _BYTE_PIECE.match(piece)

    def encode(self, chunks: list[str]) -> list[list[int]]:
        if not chunks:
            return []
        return [e.ids for e in self._tk.encode_batch(chunks, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool, added: dict[int, str]) -> str:
        """The library's decode; ids it does not know (`added`: image markers only config.json names)
        are dropped when skipping specials, else their text stands between the decoded stretches."""
        if not added or not any(i in added for i in ids):
            return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            return self._tk.decode([i for i in ids if i not in added], skip_special_tokens=True)
        parts, stretch = [], []
        for token_id in ids:
            if token_id in added:
                parts += [self._tk.decode(stretch, skip_special_tokens=False), added[token_id]]
                stretch = []
            else:
                stretch.append(token_id)
        parts.append(self._tk.decode(stretch, skip_special_tokens=False))
        return "".join(parts)


class Tokenizer:
    """Text <-> ids with Gemma's special tokens and image-placeholder expansion (tokenizer.model or .json)."""

    def __init__(self, model_proto: bytes, config: dict[str, Any] | None = None, *, description: str = TOKENIZER_FILE):
        """`model_proto`: the bytes of tokenizer.model; `config`: config.json as a dict, or None.

        Without a config, text works fully; image prompts need mm_tokens_per_image (and the image
        token id when the model has no `<image_soft_token>` piece) and raise until given one.
        """
        self._setup(_SentencePieceVocab(model_proto, description), config)

    @classmethod
    def from_tokenizer_json(cls, tokenizer_json: str | bytes, tokenizer_config: dict[str, Any] | None = None,
                            config: dict[str, Any] | None = None, *, description: str = TOKENIZER_JSON) -> Tokenizer:
        """From tokenizer.json's text, tokenizer_config.json (special token names) and config.json, as dicts."""
        self = cls.__new__(cls)
        self._setup(_TokenizersVocab(tokenizer_json, tokenizer_config or {}, description), config)
        return self

    def _setup(self, vocab: _SentencePieceVocab | _TokenizersVocab, config: dict[str, Any] | None) -> None:
        self._vocab = vocab
        self.description = vocab.description
        self.file = vocab.file  # which file the ids come from: tokenizer.model or tokenizer.json
        self.piece_count = vocab.piece_count

        config = config or {}
        boi = self._image_marker_id(BOI_TOKEN, config, ("boi_token_index",), ("boi_token_index",))
        eoi = self._image_marker_id(EOI_TOKEN, config, ("eoi_token_index",), ("eoi_token_index",))
        image = self._image_marker_id(
            IMAGE_TOKEN, config, ("image_token_index", "image_token_id"), ("image_token_index",)
        )
        encoder = config.get("encoder") if isinstance(config.get("encoder"), dict) else {}
        mm_tokens = encoder.get("mm_tokens_per_image", config.get("mm_tokens_per_image"))
        self.special = SpecialTokens(
            pad=vocab.pad,
            eos=vocab.eos,
            bos=vocab.bos,
            unk=vocab.unk,
            boi=boi,
            eoi=eoi,
            image=image,
            mm_tokens_per_image=int(mm_tokens) if mm_tokens is not None else None,
        )
        self._check_config_ids(config)

        # Strings matched in raw text as one id each, as the reference matches its added tokens:
        # the vocabulary's own (SentencePiece's control pieces), and the image markers it does not
        # match itself.
        self._text_specials: dict[str, int] = dict(vocab.raw_specials)
        for text, token_id in ((BOI_TOKEN, boi), (EOI_TOKEN, eoi), (IMAGE_TOKEN, image)):
            if token_id is not None and not vocab.matches_itself(text, token_id):
                self._text_specials[text] = token_id
        self._special_re = re.compile(_trie_pattern(self._text_specials)) if self._text_specials else None

        # Text of ids that are not (or not named as) pieces: added image tokens past the pieces,
        # and reserved slots that config.json names as an image marker, as the reference renames them.
        self._added: dict[int, str] = {
            token_id: text
            for text, token_id in ((BOI_TOKEN, boi), (EOI_TOKEN, eoi), (IMAGE_TOKEN, image))
            if token_id is not None and vocab.piece(token_id) != text
        }
        skip = set(vocab.control)
        skip |= {token_id for token_id in (boi, eoi, image) if token_id is not None}
        self._skip = frozenset(skip)  # what tokenizer.model decoding drops (tokenizer.json: the library decides)

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike | CheckpointSource, storage_options: dict | None = None
    ) -> Tokenizer:
        """From a checkpoint (local dir, fsspec URI or hub id): tokenizer.model (else tokenizer.json
        with tokenizer_config.json) and config.json."""
        src = source if isinstance(source, CheckpointSource) else CheckpointSource.open(source, storage_options)
        if not src.exists(TOKENIZER_FILE) and not src.exists(TOKENIZER_JSON):
            raise CheckpointError(
                f"checkpoint {src.description!r} has no {TOKENIZER_FILE} (the Gemma 3 SentencePiece model) and no "
                f"{TOKENIZER_JSON}; copy tokenizer.model from the original hub repo (e.g. "
                f"google/t5gemma-2-270m-270m) into it, or save the tokenizer there with transformers' save_pretrained"
            )
        config = _read_json(src, CONFIG_FILE)
        if src.exists(TOKENIZER_FILE):
            return cls(src.read_bytes(TOKENIZER_FILE), config, description=f"{src.description}/{TOKENIZER_FILE}")
        names = dict(_read_json(src, TOKENIZER_CONFIG) or {})
        if "added_tokens_decoder" not in names:
            # transformers' legacy rule: without added_tokens_decoder in tokenizer_config.json, the
            # names in special_tokens_map.json are read over it; with one, that file is not read.
            names.update(_read_json(src, SPECIAL_TOKENS_MAP) or {})
        return cls.from_tokenizer_json(src.read_bytes(TOKENIZER_JSON), names, config,
                                       description=f"{src.description}/{TOKENIZER_JSON}")

    def piece_to_id(self, piece: str) -> int | None:
        """Id of a piece (token) of the vocabulary, or None when it has no such piece."""
        return self._vocab.piece_to_id(piece)

    def _image_marker_id(
        self, text: str, config: dict, top_keys: tuple[str, ...], encoder_keys: tuple[str, ...]
    ) -> int | None:
        """Id of an image marker: its piece, else config.json's id for it (an added token)."""
        encoder = config.get("encoder") if isinstance(config.get("encoder"), dict) else {}
        stated = {f"{k}": config[k] for k in top_keys if config.get(k) is not None}
        stated.update({f"encoder.{k}": encoder[k] for k in encoder_keys if encoder.get(k) is not None})
        piece_id = self.piece_to_id(text)
        if piece_id is not None:
            for field, value in stated.items():
                if value != piece_id:
                    raise CheckpointError(
                        f"config.json {field} is {value}, but {self.description} has {text} at id {piece_id}; "
                        f"the config and {self.file} come from different checkpoints. Use the pair from one "
                        f"checkpoint (or set {field} to {piece_id})"
                    )
            return piece_id
        if not stated:
            return None
        values = set(stated.values())
        if len(values) > 1:
            raise CheckpointError(
                f"config.json states different ids for {text}: {stated}; {self.description} has no such piece "
                f"to settle it. Make them agree"
            )
        (value,) = values
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"config.json {next(iter(stated))} must be a non-negative int, got {value!r}")
        if self._vocab.piece(value) is not None and not self._vocab.is_reserved(value):
            # Only a reserved slot may be renamed; an ordinary piece there would make plain text
            # produce image tokens.
            raise CheckpointError(
                f"config.json says {text} is id {value}, but {self.description} has the text piece "
                f"{self._vocab.piece(value)!r} there and no {text} piece; use the {self.file} that "
                f"belongs to this config"
            )
        return value

    def _check_config_ids(self, config: dict) -> None:
        """pad/eos/bos in config.json (top level, decoder, encoder.text_config) must match the pieces."""
        s = self.special
        places = {"": config}
        if isinstance(config.get("decoder"), dict):
            places["decoder."] = config["decoder"]
        encoder = config.get("encoder")
        if isinstance(encoder, dict) and isinstance(encoder.get("text_config"), dict):
            places["encoder.text_config."] = encoder["text_config"]
        for prefix, section in places.items():
            for key, expected in (("pad_token_id", s.pad), ("bos_token_id", s.bos), ("eos_token_id", s.eos)):
                value = section.get(key)
                if value is None:
                    continue
                # eos_token_id may list several stop ids; the model's <eos> must be one of them.
                ok = expected in value if isinstance(value, list) else value == expected
                if not ok:
                    raise CheckpointError(
                        f"config.json {prefix}{key} is {value}, but {self.description} has id {expected} for it; "
                        f"the config and {self.file} come from different checkpoints. Use the pair from one "
                        f"checkpoint"
                    )
            vocab = section.get("vocab_size")
            if isinstance(vocab, int) and vocab < self.vocab_size:
                raise CheckpointError(
                    f"config.json {prefix}vocab_size is {vocab}, but the tokenizer needs ids up to "
                    f"{self.vocab_size - 1}; the embedding table would not cover them. Use the matching {self.file}"
                )

    # ---- properties -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can produce: the pieces plus any added image token past them."""
        extra = [t for t in (self.special.boi, self.special.eoi, self.special.image) if t is not None]
        return max([self.piece_count, *(t + 1 for t in extra)])

    pad_id = property(lambda self: self.special.pad)
    eos_id = property(lambda self: self.special.eos)
    bos_id = property(lambda self: self.special.bos)
    unk_id = property(lambda self: self.special.unk)
    boi_id = property(lambda self: self.special.boi)
    eoi_id = property(lambda self: self.special.eoi)
    image_id = property(lambda self: self.special.image)
    mm_tokens_per_image = property(lambda self: self.special.mm_tokens_per_image)

    def id_to_piece(self, token_id: int) -> str:
        if token_id in self._added:
            return self._added[token_id]
        self._check_id(token_id)
        return self._vocab.piece(token_id)

    def _check_id(self, token_id: int) -> None:
        if token_id not in self._added and self._vocab.piece(token_id) is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")

    # ---- encoding -------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False) -> list[list[int]]:
        """Texts -> ids, one list per text; special strings become one id each.

        `add_bos` prepends <bos> and `add_eos` appends <eos>; the defaults are the Gemma tokenizer's
        (and so the Gemma 3 processor's): <bos> only.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; use encode_one for a single text")
        # Split every text at special strings, encode all plain chunks in one SentencePiece call.
        plans: list[list[int | str]] = []
        chunks: list[str] = []
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be str, got {type(text).__name__}")
            plan: list[int | str] = []
            for part in self._split_specials(text):
                if isinstance(part, str):
                    chunks.append(part)
                plan.append(part)
            plans.append(plan)
        encoded = iter(self._vocab.encode(chunks))
        out = []
        for plan in plans:
            ids = [self.special.bos] if add_bos else []
            for part in plan:
                if isinstance(part, str):
                    ids.extend(next(encoded))
                else:
                    ids.append(part)
            if add_eos:
                ids.append(self.special.eos)
            out.append(ids)
        return out

    def encode_one(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        return self.encode([text], add_bos=add_bos, add_eos=add_eos)[0]

    def _split_specials(self, text: str) -> Iterable[int | str]:
        """Yield non-empty plain-text chunks (str) and special ids (int), in order."""
        if self._special_re is None:
            if text:
                yield text
            return
        last = 0
        for match in self._special_re.finditer(text):
            if match.start() > last:
                yield text[last : match.start()]
            yield self._text_specials[match.group()]
            last = match.end()
        if last < len(text):
            yield text[last:]

    # ---- images in prompts ----------------------------------------------------------------

    def image_sequence(self) -> str:
        """The text one image marker expands to."""
        self._require_image_tokens()
        images = IMAGE_TOKEN * self.special.mm_tokens_per_image
        return f"\n\n{BOI_TOKEN}{images}{EOI_TOKEN}\n\n"

    def expand_image_markers(self, text: str | None, num_images: int) -> str:
        """Prompt text with each <start_of_image> replaced by the full image span.

        The number of markers must equal `num_images`. With images and no text (None or ""),
        the text is the markers joined by single spaces, as the reference processor does.
        """
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if not text and num_images:
            text = " ".join([BOI_TOKEN] * num_images)
        text = text or ""
        markers = text.count(BOI_TOKEN)
        if markers != num_images:
            raise PromptError(
                f"the prompt has {markers} image marker(s) {BOI_TOKEN} but {num_images} image(s) were given; "
                f"put one {BOI_TOKEN} in the prompt where each image goes"
            )
        if not num_images:
            return text
        return text.replace(BOI_TOKEN, self.image_sequence())

    def encode_prompt(
        self, text: str | None, num_images: int = 0, add_bos: bool = True, add_eos: bool = False
    ) -> list[int]:
        """Prompt with `num_images` image markers -> the ids the reference processor produces."""
        ids = self.encode_one(self.expand_image_markers(text, num_images), add_bos=add_bos, add_eos=add_eos)
        if self.special.image is not None:
            found = ids.count(self.special.image)
            expected = num_images * (self.special.mm_tokens_per_image or 0)
            if found != expected:
                # Only a literal <image_soft_token> in the user's text gets here: it would claim a
                # vision feature that does not exist.
                raise PromptError(
                    f"the prompt holds {found - expected} literal {IMAGE_TOKEN} token(s) beyond those of its "
                    f"{num_images} image(s); remove {IMAGE_TOKEN} from the text"
                )
        return ids

    def encode_prompts(
        self,
        texts: Sequence[str | None],
        num_images: Sequence[int] | None = None,
        add_bos: bool = True,
        add_eos: bool = False,
    ) -> list[list[int]]:
        """Batch form of encode_prompt; `num_images[i]` images for `texts[i]` (default none)."""
        counts = list(num_images) if num_images is not None else [0] * len(texts)
        if len(counts) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(counts)} image counts")
        expanded = [self.expand_image_markers(t, n) for t, n in zip(texts, counts)]
        out = self.encode(expanded, add_bos=add_bos, add_eos=add_eos)
        if self.special.image is not None:
            for ids, n in zip(out, counts):
                expected = n * (self.special.mm_tokens_per_image or 0)
                if ids.count(self.special.image) != expected:
                    raise PromptError(f"a prompt holds literal {IMAGE_TOKEN} token(s); remove them from the text")
        return out

    def _require_image_tokens(self) -> None:
        s = self.special
        missing = [name for name, v in (("boi", s.boi), ("eoi", s.eoi), ("image", s.image)) if v is None]
        if s.mm_tokens_per_image is None:
            missing.append("mm_tokens_per_image")
        if missing:
            raise CheckpointError(
                f"image prompts need the image token ids and mm_tokens_per_image, but {self.description} and "
                f"config.json leave {', '.join(missing)} undefined; load the tokenizer from a checkpoint "
                f"directory with its config.json"
            )

    # ---- decoding -------------------------------------------------------------------------

    def decode(self, ids_batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """Ids -> text, one string per sequence."""
        return [self.decode_one(ids, skip_special_tokens=skip_special_tokens) for ids in ids_batch]

    def decode_one(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(token_id) for token_id in ids]
        for token_id in ids:
            self._check_id(token_id)
        if isinstance(self._vocab, _TokenizersVocab):
            return self._vocab.decode(ids, skip_special_tokens, self._added)
        return self._vocab.decode(ids, self._skip if skip_special_tokens else frozenset(), self._added)


def _read_json(src: CheckpointSource, name: str) -> dict | None:
    """A checkpoint's JSON file as a dict, None when absent; a broken one names the file and the fix."""
    if not src.exists(name):
        return None
    try:
        raw = json.loads(src.read_bytes(name))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{src.description}/{name} is not valid JSON ({exc}); restore it from the original checkpoint"
        ) from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{src.description}/{name} must hold a JSON object")
    return raw


__all__ = [
    "BOI_TOKEN",
    "TOKENIZER_FILE",
    "TOKENIZER_JSON",
    "EOI_TOKEN",
    "IMAGE_TOKEN",
    "PromptError",
    "SpecialTokens",
    "Tokenizer",
]
