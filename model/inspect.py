"""What a checkpoint is, without loading its weights: `inspect_checkpoint(source, storage_options)`.

Reads config.json (with generation_config.json's token ids over it), the safetensors headers
(shapes and dtypes, never the tensors), the tokenizer (tokenizer.model, else tokenizer.json), the
image preprocessing settings and, when given, a LoRA adapter's config and header; checks that
they fit together, and returns a CheckpointSummary: what job validation and `t5g2 inspect` need,
including the settings read but ignored (`warnings`). Every problem is a CheckpointError that
names the file and the fix.

Not here: loading the weights (weights.py), jobs and their settings (pipeline/).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from .adapter import LoraAdapter
from .config import GenerationDefaults, T5Gemma2Config
from .images import PREPROCESSOR_FILE, ImageProcessor
from .source import CheckpointError, CheckpointSource
from .tokenizer import Tokenizer
from .weights import inspect_adapter, is_unused_head_tensor, load_config, skipped_head_warning, weight_files


@dataclass(frozen=True)
class CheckpointSummary:
    """A checkpoint as inspect_checkpoint found it."""

    description: str  # where it is, for messages
    revision: str | None  # the hub revision, when it came from the hub
    config: T5Gemma2Config  # config.json, parsed and validated
    weight_files: tuple[str, ...]  # the safetensors files holding the weights
    weight_bytes: int  # their total size as stored
    parameters: int  # tensor elements in them (the tied embedding counted once, as stored)
    weight_dtypes: tuple[str, ...]  # the safetensors dtypes stored, e.g. ("BF16",)
    tokenizer_vocab_size: int  # ids of the tokenizer
    image_tokens: bool  # the tokenizer and config define the image placeholder tokens
    has_preprocessor: bool  # preprocessor_config.json is present (else the defaults at the tower's size)
    image_size: int  # the side images are resized to (equal to the vision tower's)
    files: tuple[str, ...]  # every file of the checkpoint directory
    tokenizer_file: str = "tokenizer.model"  # the tokenizer file read: tokenizer.model, else tokenizer.json
    generation: GenerationDefaults | None = None  # generation_config.json (its ids applied, its settings shown only)
    warnings: tuple[str, ...] = ()  # settings and tensors read but ignored (soft-capping, SigLIP's head)
    adapter: LoraAdapter | None = None  # the LoRA adapter checked against this model, when one was given


def _safetensors_header(src: CheckpointSource, name: str) -> dict:
    """The JSON header of a safetensors file: 8 bytes of little-endian length, then the header."""
    with src.fs.open(src.path(name), "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * 2**20:
            raise CheckpointError(f"{src.description}/{name}: a safetensors header of {length} bytes is not plausible")
        return json.loads(handle.read(length))


def inspect_checkpoint(source: str | os.PathLike | CheckpointSource, storage_options: dict | None = None,
                       *, needs_images: bool = False, adapter: str | os.PathLike | None = None,
                       adapter_storage_options: dict | None = None) -> CheckpointSummary:
    """Summarize and check a checkpoint; with `needs_images`, also that it can take images; with
    `adapter`, also that the LoRA adapter there fits it (AdapterError otherwise)."""
    src = source if isinstance(source, CheckpointSource) else CheckpointSource.open(source, storage_options)
    config = load_config(src)
    shards = weight_files(src)
    tokenizer = Tokenizer.from_pretrained(src)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{src.description}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{config.vocab_size}; use the tokenizer of this checkpoint")
    try:
        tokenizer.image_sequence()
        image_tokens = True
    except (CheckpointError, ValueError):
        if needs_images:
            raise
        image_tokens = False
    processor = ImageProcessor.from_pretrained(src)
    expected = (config.vision.image_size, config.vision.image_size)
    if needs_images and processor.size != expected:
        raise CheckpointError(
            f"{src.description}: {PREPROCESSOR_FILE} resizes images to {processor.size[0]}x{processor.size[1]} but "
            f"the vision tower takes {expected[0]}x{expected[1]}; use the checkpoint's own {PREPROCESSOR_FILE}")
    parameters, dtypes, size = 0, set(), 0
    skipped = []
    for name in shards:
        try:
            size += int(src.fs.size(src.path(name)))
            header = _safetensors_header(src, name)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{src.description}/{name}: cannot read its size or header ({exc})") from exc
        for key, entry in header.items():
            if key != "__metadata__":
                parameters += math.prod(entry["shape"])
                dtypes.add(entry["dtype"])
                if is_unused_head_tensor(config, key):
                    skipped.append(key)
    warnings = list(config.warnings) + ([skipped_head_warning(skipped)] if skipped else [])
    lora = None
    if adapter is not None:
        options = storage_options if adapter_storage_options is None else adapter_storage_options
        lora = inspect_adapter(adapter, config, options)
    return CheckpointSummary(
        description=src.description, revision=src.revision, config=config, weight_files=tuple(shards),
        weight_bytes=size, parameters=parameters, weight_dtypes=tuple(sorted(dtypes)),
        tokenizer_vocab_size=tokenizer.vocab_size, image_tokens=image_tokens,
        has_preprocessor=src.exists(PREPROCESSOR_FILE), image_size=processor.size[0], files=tuple(src.files()),
        tokenizer_file=tokenizer.file, generation=config.generation, warnings=tuple(warnings), adapter=lora)
