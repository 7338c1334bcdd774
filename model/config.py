"""T5Gemma 2 configuration: frozen dataclasses parsed from a Hugging Face config.json.

Reads the nested layout that `T5Gemma2ForConditionalGeneration` checkpoints use
(`encoder.text_config`, `encoder.vision_config`, `decoder`), in both the current
`rope_parameters` form and the older `rope_theta` / `rope_local_base_freq` / `rope_scaling`
form, and checks every option our model implements. Anything we do not implement fails
here, naming the field, rather than computing something different later. Two settings that
transformers accepts but never uses are ignored with a warning (`T5Gemma2Config.warnings`):
`attn_logit_softcapping` (the reference stores it and never applies it) and SigLIP's
`vision_use_head` (the pooling head exists but T5Gemma 2 reads the patch outputs).

`GenerationDefaults` is generation_config.json: its token ids (EOS list, decoder start, pad)
override config.json's, as they do for transformers' generate(); its sampling settings are
kept only to be shown, a job's own settings decide.

Not here: weights (weights.py), tokenizer ids in tokenizer.model / tokenizer.json (tokenizer.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

ARCHITECTURE = "T5Gemma2ForConditionalGeneration"
MODEL_TYPE = "t5gemma2"
LAYER_TYPES = ("sliding_attention", "full_attention")
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


class ConfigError(ValueError):
    """config.json describes something we cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type."""

    theta: float  # base of the inverse frequencies
    scaling: str = "default"  # "default" or "linear"
    factor: float = 1.0  # linear scaling divides the inverse frequencies by this

    def __post_init__(self):
        if self.theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.theta}")
        if self.scaling not in ("default", "linear"):
            raise ConfigError(
                f"rope_type {self.scaling!r} is not supported: use 'default' or 'linear' "
                f"(the released T5Gemma 2 checkpoints use these)"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True)
class TextConfig:
    """One text stack (encoder or decoder): Gemma 3 blocks."""

    vocab_size: int  # rows of the (tied) embedding table
    hidden_size: int  # model width H
    intermediate_size: int  # GeGLU inner width
    num_layers: int  # transformer blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int  # width of one head
    layer_types: tuple[str, ...]  # per layer: "sliding_attention" or "full_attention"
    sliding_window: int  # window of sliding layers (encoder: bidirectional rule, decoder: causal)
    rope: dict  # layer type -> RopeConfig
    query_pre_attn_scalar: float  # attention scale is query_pre_attn_scalar ** -0.5
    rms_norm_eps: float  # epsilon of every RMSNorm
    final_logit_softcapping: float | None  # tanh cap on LM logits (decoder only), None = off
    # the context the checkpoint was trained for (max_position_embeddings): the longest prompt a job may
    # ask for (input.max_input_tokens is checked against the encoder's); rotary positions have no table,
    # so nothing here stops longer inputs, the job check does
    max_position_embeddings: int = 131_072

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "sliding_window", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_layers}"
            )
        for kind in self.layer_types:
            if kind not in LAYER_TYPES:
                raise ConfigError(f"layer_types entry {kind!r} is unknown: use one of {LAYER_TYPES}")
            if kind not in self.rope:
                raise ConfigError(f"rope_parameters has no entry for layer type {kind!r}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def scaling(self) -> float:
        return self.query_pre_attn_scalar ** -0.5


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (no pooling head)."""

    hidden_size: int  # width of the vision transformer
    intermediate_size: int  # MLP inner width
    num_layers: int  # transformer blocks
    num_heads: int  # attention heads (head width = hidden_size / num_heads)
    image_size: int  # square input side in pixels
    patch_size: int  # square patch side in pixels
    num_channels: int  # input channels (3)
    layer_norm_eps: float  # epsilon of the LayerNorms and the soft-embedding RMSNorm
    # vision_use_head: the checkpoint holds SigLIP's pooling head, which T5Gemma 2 never runs
    # (it reads the patch outputs); the loader skips its tensors
    has_unused_head: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) must be a multiple of "
                f"vision_config.num_attention_heads ({self.num_heads})"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class T5Gemma2Config:
    """The whole encoder-decoder model."""

    encoder: TextConfig  # encoder text stack
    decoder: TextConfig  # decoder text stack
    vision: VisionConfig  # SigLIP tower feeding the encoder
    mm_tokens_per_image: int  # image tokens one image becomes after pooling
    image_token_id: int  # placeholder id replaced by image features
    boi_token_id: int  # begin-of-image id
    eoi_token_id: int  # end-of-image id; embedded by its own learned vector
    pad_token_id: int  # padding id
    bos_token_id: int  # decoder start token
    eos_token_ids: tuple[int, ...]  # ids that end generation
    # settings read but ignored, one sentence each (attention soft-capping, an unused vision head)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # generation_config.json as read, None without one; its ids are already applied above
    generation: GenerationDefaults | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.encoder.hidden_size != self.decoder.hidden_size:
            raise ConfigError(
                f"encoder hidden_size ({self.encoder.hidden_size}) != decoder hidden_size "
                f"({self.decoder.hidden_size}): T5Gemma 2 ties both sides to one embedding table"
            )
        if self.encoder.vocab_size != self.decoder.vocab_size:
            raise ConfigError(
                f"encoder vocab_size ({self.encoder.vocab_size}) != decoder vocab_size ({self.decoder.vocab_size})"
            )
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image:
            raise ConfigError(f"mm_tokens_per_image must be a square number, got {self.mm_tokens_per_image}")
        if self.vision.patches_per_side % side:
            raise ConfigError(
                f"vision patches per side ({self.vision.patches_per_side}) must be a multiple of "
                f"sqrt(mm_tokens_per_image) ({side}) for the average pooling"
            )
        if not self.eos_token_ids:
            raise ConfigError("eos_token_id is missing: set it in config.json (an int or a list of ints)")

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    def to_hf_dict(self) -> dict:
        """config.json content in the layout transformers writes."""
        return to_hf_dict(self)

    @property
    def hidden_size(self) -> int:
        return self.decoder.hidden_size

    # ---- parsing -----------------------------------------------------------------------------

    @classmethod
    def from_json_text(cls, text: str | bytes, where: str = "config.json") -> T5Gemma2Config:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not valid JSON ({exc}); re-save it with save_pretrained") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must hold a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, where=where)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json") -> T5Gemma2Config:
        architectures = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE and ARCHITECTURE not in architectures:
            raise ConfigError(
                f"{where}: model_type {model_type!r} / architectures {architectures!r} is not T5Gemma 2; "
                f"this tool runs {ARCHITECTURE} checkpoints (model_type {MODEL_TYPE!r})"
            )
        for key in ("encoder", "decoder"):
            if not isinstance(raw.get(key), dict):
                raise ConfigError(f"{where}: field {key!r} is missing or not an object")
        enc_raw = raw["encoder"]
        for key in ("text_config", "vision_config"):
            if not isinstance(enc_raw.get(key), dict):
                raise ConfigError(f"{where}: field 'encoder.{key}' is missing or not an object")

        if not _get(raw, "tie_word_embeddings", True):
            raise ConfigError(f"{where}: tie_word_embeddings is false; T5Gemma 2 checkpoints tie them (set it true)")

        warnings: list[str] = []
        encoder = _text_config(enc_raw["text_config"], f"{where}: encoder.text_config", warnings)
        decoder = _text_config(raw["decoder"], f"{where}: decoder", warnings)
        vision = _vision_config(enc_raw["vision_config"], f"{where}: encoder.vision_config", warnings)

        eos = raw.get("eos_token_id", raw["decoder"].get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        # The top-level image token wins over the encoder's: the reference copies it down.
        image_token = raw.get("image_token_index", raw.get("image_token_id", enc_raw.get("image_token_index")))
        return cls(
            encoder=encoder,
            decoder=decoder,
            vision=vision,
            mm_tokens_per_image=_int(enc_raw, "mm_tokens_per_image", 256, f"{where}: encoder"),
            image_token_id=_require_int(image_token, f"{where}: image_token_index"),
            boi_token_id=_int(enc_raw, "boi_token_index", 255_999, f"{where}: encoder"),
            # The reference copies the encoder's end-of-image id up to the top level: the encoder's wins.
            eoi_token_id=_require_int(_get(enc_raw, "eoi_token_index", _get(raw, "eoi_token_index", 256_000)),
                                      f"{where}: encoder.eoi_token_index"),
            pad_token_id=_int(raw["decoder"], "pad_token_id", 0, f"{where}: decoder"),
            bos_token_id=_int(raw["decoder"], "bos_token_id", 2, f"{where}: decoder"),
            eos_token_ids=tuple(_require_int(e, f"{where}: eos_token_id") for e in eos_ids),
            warnings=tuple(warnings),
        )

    def with_generation_config(self, generation: GenerationDefaults) -> T5Gemma2Config:
        """This config with generation_config.json's token ids in place of config.json's.

        As transformers' generate() does: its values win; decoder start is decoder_start_token_id,
        else its bos_token_id. A key it leaves out (or null) keeps config.json's value here, where
        transformers would have none (no EOS stop at all, or no decoder start).
        """
        start = generation.decoder_start_token_id
        if start is None:
            start = generation.bos_token_id
        return replace(
            self,
            eos_token_ids=generation.eos_token_ids if generation.eos_token_ids is not None else self.eos_token_ids,
            bos_token_id=start if start is not None else self.bos_token_id,
            pad_token_id=generation.pad_token_id if generation.pad_token_id is not None else self.pad_token_id,
            generation=generation,
        )


def _get(raw: dict, key: str, default: Any) -> Any:
    value = raw.get(key, default)
    return default if value is None else value


def _require_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field} must be an integer, got {value!r}")
    return value


def _int(raw: dict, key: str, default: int, where: str) -> int:
    return _require_int(_get(raw, key, default), f"{where}.{key}")


def _float(raw: dict, key: str, default: float | None, where: str) -> float | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
    return float(value)


def _text_config(raw: dict, where: str, warnings: list[str]) -> TextConfig:
    activation = _get(raw, "hidden_activation", raw.get("hidden_act", "gelu_pytorch_tanh"))
    if activation != "gelu_pytorch_tanh":
        raise ConfigError(f"{where}.hidden_activation {activation!r} is not supported: Gemma 3 uses gelu_pytorch_tanh")
    if raw.get("attention_bias"):
        raise ConfigError(f"{where}.attention_bias is true; T5Gemma 2 has no attention biases (set it false)")
    if raw.get("attn_logit_softcapping") is not None:
        # The reference T5Gemma 2 attention stores this cap and never applies it (released configs
        # set it to null): applying it would differ from the reference, so it is ignored, loudly.
        cap = _float(raw, "attn_logit_softcapping", None, where)
        warnings.append(
            f"{where}.attn_logit_softcapping is {cap:g}: ignored, as in transformers, whose T5Gemma 2 "
            f"attention stores it and never applies it (the logits equal the reference's)"
        )
    num_layers = _int(raw, "num_hidden_layers", 26, where)
    layer_types = raw.get("layer_types")
    if layer_types is None:
        pattern = _int(raw, "sliding_window_pattern", 6, where)
        layer_types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)
        ]
    if not isinstance(layer_types, list):
        raise ConfigError(f"{where}.layer_types must be a list, got {layer_types!r}")
    num_heads = _int(raw, "num_attention_heads", 8, where)
    hidden = _int(raw, "hidden_size", 2304, where)
    head_dim = raw.get("head_dim") or hidden // num_heads
    try:
        return TextConfig(
            vocab_size=_int(raw, "vocab_size", 262_208, where),
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size", 9216, where),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=_int(raw, "num_key_value_heads", 4, where),
            head_dim=_require_int(head_dim, f"{where}.head_dim"),
            layer_types=tuple(layer_types),
            sliding_window=_int(raw, "sliding_window", 4096, where),
            rope=_rope(raw, set(layer_types), where),
            query_pre_attn_scalar=_float(raw, "query_pre_attn_scalar", 256, where),
            rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6, where),
            final_logit_softcapping=_float(raw, "final_logit_softcapping", None, where),
            max_position_embeddings=_int(raw, "max_position_embeddings", 131_072, where),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _rope(raw: dict, layer_types: set[str], where: str) -> dict:
    """Per-layer-type rotary settings, from either config.json generation."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{where}.rope_parameters must be an object, got {params!r}")
    if params and not set(params) <= set(LAYER_TYPES):
        # One flat dict applies to every layer type (as the reference standardizes it).
        params = {kind: dict(params) for kind in LAYER_TYPES}
    if not params:
        # Older layout: rope_theta (global), rope_local_base_freq (local), rope_scaling (global only).
        params = {
            "full_attention": {"rope_theta": raw.get("rope_theta", DEFAULT_THETA["full_attention"]),
                               **(raw.get("rope_scaling") or {})},
            "sliding_attention": {"rope_theta": raw.get("rope_local_base_freq", DEFAULT_THETA["sliding_attention"])},
        }
    rope = {}
    for kind in LAYER_TYPES:
        entry = params.get(kind) or {}
        scaling = entry.get("rope_type", entry.get("type", "default"))
        factor = entry.get("factor", 1.0) if scaling == "linear" else 1.0
        rope[kind] = RopeConfig(
            theta=float(entry.get("rope_theta", DEFAULT_THETA[kind])), scaling=scaling, factor=float(factor)
        )
    return rope


def _vision_config(raw: dict, where: str, warnings: list[str]) -> VisionConfig:
    model_type = raw.get("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
        raise ConfigError(f"{where}.model_type {model_type!r} is not supported: T5Gemma 2 uses siglip_vision_model")
    # SiglipVisionConfig's default is true; T5Gemma 2 never runs the head (it reads the patch outputs).
    use_head = _get(raw, "vision_use_head", True)
    if not isinstance(use_head, bool):
        raise ConfigError(f"{where}.vision_use_head must be true or false, got {use_head!r}")
    if use_head:
        stated = "is true" if "vision_use_head" in raw else "is not set (SiglipVisionConfig's default: true)"
        warnings.append(
            f"{where}.vision_use_head {stated}: SigLIP's pooling head is unused by T5Gemma 2 (it reads the patch "
            f"outputs, as transformers does), so the head's tensors are skipped when the weights load"
        )
    activation = raw.get("hidden_act", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise ConfigError(f"{where}.hidden_act {activation!r} is not supported: SigLIP uses gelu_pytorch_tanh")
    try:
        return VisionConfig(
            hidden_size=_int(raw, "hidden_size", 768, where),
            intermediate_size=_int(raw, "intermediate_size", 3072, where),
            num_layers=_int(raw, "num_hidden_layers", 12, where),
            num_heads=_int(raw, "num_attention_heads", 12, where),
            image_size=_int(raw, "image_size", 224, where),
            patch_size=_int(raw, "patch_size", 16, where),
            num_channels=_int(raw, "num_channels", 3, where),
            layer_norm_eps=_float(raw, "layer_norm_eps", 1e-6, where),
            has_unused_head=use_head,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


# ---- generation_config.json ----------------------------------------------------------------

GENERATION_CONFIG_FILE = "generation_config.json"
_GENERATION_ID_KEYS = ("eos_token_id", "decoder_start_token_id", "bos_token_id", "pad_token_id")
# Keys transformers writes that say nothing about which tokens are decoded (bookkeeping, what
# generate() returns, its cache): not worth showing beside the sampling settings.
_GENERATION_BOOKKEEPING = frozenset({"transformers_version", "_from_model_config", "use_cache", "cache_implementation",
                                     "return_dict_in_generate", "output_attentions", "output_hidden_states",
                                     "output_scores", "output_logits"})


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json: token ids that override config.json, and settings shown only."""

    eos_token_ids: tuple[int, ...] | None  # eos_token_id (an int or a list); None where absent or null
    decoder_start_token_id: int | None  # the decoder's first token; None where absent
    bos_token_id: int | None  # the decoder start when decoder_start_token_id is absent
    pad_token_id: int | None  # padding id
    settings: tuple[tuple[str, Any], ...]  # every other key (do_sample, temperature, ...), sorted: never applied

    @classmethod
    def from_json_text(cls, text: str | bytes, where: str = GENERATION_CONFIG_FILE,
                       vocab_size: int | None = None) -> GenerationDefaults:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not valid JSON ({exc}); re-save it with save_pretrained, or delete it "
                              f"to use config.json's token ids") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must hold a JSON object, got {type(raw).__name__}")

        def token(value: Any, key: str) -> int | None:
            if value is None:
                return None
            value = _require_int(value, f"{where}: {key}")
            if value < 0 or (vocab_size is not None and value >= vocab_size):
                raise ConfigError(f"{where}: {key} {value} is outside the vocabulary (0..{(vocab_size or 1) - 1}); "
                                  f"fix it, or remove it to use config.json's")
            return value

        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            if not eos:
                raise ConfigError(f"{where}: eos_token_id is an empty list, so generation would never stop at an "
                                  f"end token; list the end ids, or remove the key to use config.json's")
            eos_ids = tuple(dict.fromkeys(token(e, "eos_token_id") for e in eos))
        else:
            single = token(eos, "eos_token_id")
            eos_ids = None if single is None else (single,)
        settings = tuple(sorted((k, v) for k, v in raw.items()
                                if k not in _GENERATION_ID_KEYS and k not in _GENERATION_BOOKKEEPING))
        return cls(eos_token_ids=eos_ids,
                   decoder_start_token_id=token(raw.get("decoder_start_token_id"), "decoder_start_token_id"),
                   bos_token_id=token(raw.get("bos_token_id"), "bos_token_id"),
                   pad_token_id=token(raw.get("pad_token_id"), "pad_token_id"), settings=settings)


# ---- writing -----------------------------------------------------------------------------------


def _text_to_hf(cfg: TextConfig, model_type: str, ids: dict) -> dict:
    return {
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": list(cfg.layer_types),
        "sliding_window": cfg.sliding_window,
        "rope_parameters": {
            kind: {"rope_type": r.scaling, "rope_theta": r.theta,
                   **({"factor": r.factor} if r.scaling == "linear" else {})}
            for kind, r in cfg.rope.items()
        },
        "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar) if float(cfg.query_pre_attn_scalar).is_integer()
        else cfg.query_pre_attn_scalar,
        "rms_norm_eps": cfg.rms_norm_eps,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "tie_word_embeddings": True,
        **ids,
    }


def to_hf_dict(config: T5Gemma2Config) -> dict:
    """The config.json that transformers writes for the same model (current layout)."""
    ids = {"pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
           "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) > 1 else config.eos_token_ids[0]}
    v = config.vision
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "encoder": {
            "model_type": "t5gemma2_encoder",
            "text_config": _text_to_hf(config.encoder, "t5gemma2_text", ids),
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": "gelu_pytorch_tanh",
                "vision_use_head": False,
            },
            "mm_tokens_per_image": config.mm_tokens_per_image,
            "boi_token_index": config.boi_token_id,
            "eoi_token_index": config.eoi_token_id,
            "image_token_index": config.image_token_id,
            "tie_word_embeddings": True,
        },
        "decoder": _text_to_hf(config.decoder, "t5gemma2_decoder", ids),
        "image_token_index": config.image_token_id,
        "eoi_token_index": config.eoi_token_id,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "vocab_size": config.vocab_size,
        **ids,
    }
