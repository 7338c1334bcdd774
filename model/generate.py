"""Generation: requests in, results out in input order.

PLACEHOLDER API (being implemented): the dataclasses below are the stable interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GenerationParams:
    """How one request is decoded."""

    max_new_tokens: int = 64  # hard cap on generated tokens (EOS included)
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens
    temperature: float = 0.0  # 0 = greedy (or beam search when num_beams > 1)
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus sampling mass; 1 = off
    seed: int | None = None  # per-request sampling seed: same seed, same sample in any batch
    num_beams: int = 1  # > 1 = beam search
    length_penalty: float = 1.0  # beam score = sum logprob / length ** length_penalty
    eos_token_ids: tuple[int, ...] | None = None  # None = the checkpoint's


@dataclass
class Request:
    """One prompt: token ids with image placeholders already expanded, and its images."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [N, 3, S, S] for N images in the prompt, or None
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass
class Result:
    token_ids: list[int]  # generated ids; ends with EOS when finish_reason == "eos"
    finish_reason: str  # "eos" | "length" | "error"
    error: str | None = None  # message when finish_reason == "error" (e.g. out of memory)
    error_kind: str | None = None  # e.g. "out_of_memory"
