"""Small random T5Gemma 2 checkpoints in the real Hugging Face format, for tests.

Built with transformers' own T5Gemma2ForConditionalGeneration and written with
save_pretrained, so our loader reads exactly the key layout and config.json a real
checkpoint has. Every parameter (norms, end-of-image vector and projector included) is
randomised: zeros would hide mistakes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# Three shapes that between them cover what the parity tests must: grouped-query (A),
# plain multi-head (B) and multi-query (C) attention; sliding windows shorter than the
# inputs; default and linear RoPE; final-logit soft-capping (B); images in all of them.
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_attention_heads=2,
              num_hidden_layers=2, image_size=32, patch_size=4, vision_use_head=False)

TEXT_A = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
TEXT_B = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
              num_key_value_heads=3, head_dim=16, sliding_window=4, query_pre_attn_scalar=20,
              layer_types=["sliding_attention", "full_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
              final_logit_softcapping=3.0)
TEXT_C = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=1, head_dim=32, sliding_window=3, query_pre_attn_scalar=32,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}})
SHAPES = {"A": TEXT_A, "B": TEXT_B, "C": TEXT_C}

# Token ids of the tiny vocabularies (a SentencePiece model trained in tests uses the same).
SPECIAL = dict(pad=0, eos=1, bos=2, boi=4, eoi=5, image=6)


def hf_config(text: dict, vocab_size: int = 512, mm_tokens_per_image: int = 4, decoder: dict | None = None,
              vision: dict | None = None):
    from transformers import T5Gemma2Config

    enc = dict(text, vocab_size=vocab_size)
    dec = dict(decoder or text, vocab_size=vocab_size)
    return T5Gemma2Config(
        encoder=dict(text_config=enc, vision_config=vision or VISION, mm_tokens_per_image=mm_tokens_per_image,
                     boi_token_index=SPECIAL["boi"], eoi_token_index=SPECIAL["eoi"],
                     image_token_index=SPECIAL["image"]),
        decoder=dec,
        image_token_index=SPECIAL["image"],
        pad_token_id=SPECIAL["pad"], eos_token_id=SPECIAL["eos"], bos_token_id=SPECIAL["bos"],
    )


def randomize(model, seed: int = 0, scale: float = 0.5):
    """Fill every parameter with random values (in place) and return the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            std = scale / fan_in ** 0.5 if p.dim() > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def build_reference(text: dict = TEXT_A, seed: int = 0, **config_kwargs):
    """A randomised transformers T5Gemma2ForConditionalGeneration (eager attention, eval mode)."""
    from transformers import T5Gemma2ForConditionalGeneration

    config = hf_config(copy.deepcopy(text), **config_kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T5Gemma2ForConditionalGeneration(config)
    return randomize(model, seed).eval()


def save_checkpoint(ref_model, directory: Path, max_shard_size: str | None = None) -> Path:
    directory = Path(directory)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    ref_model.save_pretrained(directory, **kwargs)
    return directory


def add_tokenizer(directory: Path) -> dict:
    """Train a SentencePiece tokenizer.model into a saved checkpoint (vocabulary 512) and point
    config.json's image ids at its pieces, so that inspect_checkpoint and the pipeline accept it.
    Returns the special ids (helpers.spm.special_token_ids)."""
    import json

    from helpers.spm import special_token_ids, train_sentencepiece

    directory = Path(directory)
    ids = special_token_ids(train_sentencepiece(directory, vocab_size=512))
    assert ids["piece_count"] <= 512 and (ids["pad"], ids["eos"], ids["bos"]) == (0, 1, 2), ids
    config = json.loads((directory / "config.json").read_text())
    config["image_token_index"] = config["encoder"]["image_token_index"] = ids["image"]
    config["eoi_token_index"] = config["encoder"]["eoi_token_index"] = ids["eoi"]
    config["encoder"]["boi_token_index"] = ids["boi"]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return ids


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths (ids 10..511, clear of the special ids), reproducible."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 512, (n,), generator=gen).tolist() for n in lengths]


def tiny_pair(directory: Path):
    """(transformers reference, our model loaded from its saved checkpoint) at shape A, seed 42."""
    import model

    ref = build_reference(SHAPES["A"], seed=42)
    return ref, model.load_pretrained(save_checkpoint(ref, directory))
