"""T5Gemma 2 in pure PyTorch: config, model, weights, tokenizer, images, generation.

Public API (stable names, see docs/architecture.md):
    load_pretrained(source, dtype="float32", device="cpu", adapter=None) -> T5Gemma2 (a LoRA adapter merged)
    inspect_checkpoint(source, storage_options, adapter=None) -> CheckpointSummary (no weights loaded)
    Tokenizer.from_pretrained(source)
    Generator(model).generate([Request(...)]) -> [Result]
    Scorer(model).score([ScoreRequest(input_ids, candidates)]) -> [ScoreResult] (candidate log-likelihoods)

Not here: rows, columns, Ray or storage of outputs (operators/, pipeline/).
"""

from .adapter import AdapterError, LoraAdapter
from .config import ConfigError, GenerationDefaults, T5Gemma2Config
from .generate import GenerationParams, Generator, Request, Result
from .images import ImageError, ImageProcessor
from .inspect import CheckpointSummary, inspect_checkpoint
from .score import Scorer, ScoreRequest, ScoreResult
from .source import CheckpointError, CheckpointSource
from .t5gemma2 import T5Gemma2
from .tokenizer import PromptError, Tokenizer
from .weights import inspect_adapter, load_config, load_pretrained, random_model, save_pretrained

__all__ = [
    "AdapterError",
    "CheckpointError",
    "CheckpointSource",
    "CheckpointSummary",
    "GenerationDefaults",
    "GenerationParams",
    "ImageError",
    "ImageProcessor",
    "LoraAdapter",
    "PromptError",
    "Tokenizer",
    "Generator",
    "Request",
    "Result",
    "Scorer",
    "ScoreRequest",
    "ScoreResult",
    "ConfigError",
    "T5Gemma2",
    "T5Gemma2Config",
    "inspect_adapter",
    "inspect_checkpoint",
    "load_config",
    "load_pretrained",
    "random_model",
    "save_pretrained",
]
