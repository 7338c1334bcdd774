"""LoRA adapters in PEFT's format, merged into the base weights at load: `read_adapter`, `LoraAdapter`.

An adapter is a directory (local, fsspec URI or hub id) holding adapter_config.json and
adapter_model.safetensors, as peft's `save_pretrained` writes them. Each adapted projection W
(a checkpoint tensor, [out, in]) becomes

    W + scale * B @ A        A [r, in], B [out, r]; scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

computed in float32 before the weights are cast to the run's dtype. The rank of each module is
read off its tensors, so peft's per-module `rank_pattern` needs nothing more. The merge happens on
the checkpoint's separate tensors, before the loader joins q|k|v and gate|up into one matmul
(weights.py), so a LoRA on q_proj lands in exactly the q rows of the fused weight.

Supported: plain LoRA on the Linear projections, i.e. the text stacks' q/k/v/o_proj and
gate/up/down_proj (encoder and decoder) and the vision tower's q/k/v/out_proj and fc1/fc2 (a
target such as "q_proj" reaches both, as peft matches by name). Refused, naming the setting:
other PEFT methods, DoRA, trained biases, modules_to_save, per-module alpha, LoRA on parameters,
activated LoRA, and targets that are not such projections (the tied embedding / LM head, the patch
convolution): merging those would need more than W += B @ A, or would change tied weights twice.

Not here: the base checkpoint's tensors (weights.py); which adapter a job uses and its identity
(pipeline/spec.py, pipeline/validate.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from .source import CheckpointError, CheckpointSource

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# peft's tensor names: the wrapped model's module path under "base_model.model.", then lora_A / lora_B.
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")
# Our parameters a LoRA may change: plain Linear projections (see the module docstring).
_SUPPORTED = re.compile(
    r"^(?:(?:encoder|decoder)\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"|vision_tower\.layers\.\d+\.(?:[qkv]_proj|out_proj|fc1|fc2))\.weight$"
)

# adapter_config.json settings whose non-default value changes the math beyond W += scale * B @ A.
# (key, what is allowed, why it is refused)
_REFUSED = [
    ("use_dora", lambda v: not v, "DoRA (use_dora = true) rescales each weight column by a learned magnitude"),
    ("bias", lambda v: v in (None, "none"), "trained biases (bias != \"none\") are separate tensors"),
    ("lora_bias", lambda v: not v, "lora_bias = true adds a bias to lora_B"),
    ("modules_to_save", lambda v: not v, "modules_to_save holds whole replacement modules"),
    ("alpha_pattern", lambda v: not v, "per-module lora_alpha (alpha_pattern) is not implemented here"),
    ("target_parameters", lambda v: not v, "LoRA on nn.Parameter tensors (target_parameters)"),
    ("alora_invocation_tokens", lambda v: not v, "activated LoRA applies only after its invocation tokens, so it "
                                                 "cannot be merged into the weights"),
    ("layer_replication", lambda v: not v, "layer_replication changes the layer structure"),
    ("trainable_token_indices", lambda v: not v, "trainable_token_indices trains embedding rows"),
    ("use_qalora", lambda v: not v, "QALoRA (use_qalora = true) pools the input groups"),
]


class AdapterError(CheckpointError):
    """An adapter cannot be merged; the message names the file, setting or tensor and the fix."""


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter as read: its settings and the projections it changes (no tensors held)."""

    description: str  # where it is, for messages
    revision: str | None  # the hub revision, when it came from the hub
    rank: int  # adapter_config.json r (modules may differ by rank_pattern: see ranks)
    ranks: tuple[int, ...]  # the ranks its tensors have, sorted
    alpha: float  # lora_alpha
    use_rslora: bool  # scale alpha / sqrt(r) instead of alpha / r
    target_modules: tuple[str, ...]  # as adapter_config.json states them (names, or one regex)
    modules: dict  # our parameter name -> (checkpoint key, rank) of every weight it changes
    base_model: str | None  # base_model_name_or_path, as peft recorded it
    files: tuple[str, ...]  # the adapter's files read (config, weights)
    source: CheckpointSource | None = field(default=None, repr=False, compare=False)  # where to read the tensors

    @property
    def targets(self) -> tuple[str, ...]:
        """The projection names it changes (q_proj, down_proj, fc1, ...), sorted."""
        return tuple(sorted({name.rsplit(".", 2)[-2] for name in self.modules}))

    def scale(self, rank: int) -> float:
        return self.alpha / math.sqrt(rank) if self.use_rslora else self.alpha / rank

    def describe(self) -> str:
        ranks = "/".join(map(str, self.ranks))
        scales = "/".join(f"{self.scale(r):g}" for r in self.ranks)
        kind = "rsLoRA" if self.use_rslora else "LoRA"
        return (f"{kind} rank {ranks}, alpha {self.alpha:g} (scale {scales}), {len(self.modules)} projections: "
                f"{', '.join(self.targets)}")


def _open(source: str | os.PathLike | CheckpointSource, storage_options: dict | None) -> CheckpointSource:
    src = source if isinstance(source, CheckpointSource) else CheckpointSource.open(source, storage_options)
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not src.exists(name)]
    if missing:
        pickles = [f for f in src.files() if f.startswith("adapter_model.") and f != ADAPTER_WEIGHTS]
        hint = (f" (it has {', '.join(pickles)}: only safetensors weights are loaded, re-save the adapter with "
                f"peft's save_pretrained(safe_serialization=True))" if pickles else "")
        raise AdapterError(f"adapter {src.description!r} has no {' and no '.join(missing)}{hint}; pass the directory "
                           f"that peft's save_pretrained wrote")
    return src


def _adapter_config(src: CheckpointSource) -> dict:
    where = f"{src.description}/{ADAPTER_CONFIG}"
    try:
        raw = json.loads(src.read_bytes(ADAPTER_CONFIG))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{where} is not valid JSON ({exc}); re-save the adapter with peft") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{where} must hold a JSON object")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{where}: peft_type is {peft_type!r}; only LoRA adapters (peft_type \"LORA\") can be "
                           f"merged here")
    for key, allowed, why in _REFUSED:
        if not allowed(raw.get(key)):
            raise AdapterError(f"{where}: {key} is {raw.get(key)!r}, which is not supported: {why}. Merge the "
                               f"adapter with peft (merge_and_unload, then save_pretrained) and run the merged "
                               f"checkpoint instead")
    rank, alpha = raw.get("r"), raw.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"{where}: r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    if not isinstance(raw.get("use_rslora", False), bool):
        raise AdapterError(f"{where}: use_rslora must be true or false, got {raw.get('use_rslora')!r}")
    return raw


def _header(src: CheckpointSource) -> dict:
    """adapter_model.safetensors' header: tensor name -> shape (the tensors are not read)."""
    try:
        with src.fs.open(src.path(ADAPTER_WEIGHTS), "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"a header of {length} bytes is not plausible")
            header = json.loads(handle.read(length))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise AdapterError(f"{src.description}/{ADAPTER_WEIGHTS} is not a readable safetensors file ({exc})") from exc


def read_adapter(source: str | os.PathLike | CheckpointSource, expected: dict[str, tuple[int, ...]],
                 parameter_name, storage_options: dict | None = None) -> LoraAdapter:
    """Read and check an adapter against the base model, without reading its tensors.

    `expected`: our parameter name -> shape (fused projections listed as their parts);
    `parameter_name`: checkpoint key -> our name (weights.parameter_name).
    """
    src = _open(source, storage_options)
    raw = _adapter_config(src)
    shapes = _header(src)
    halves: dict[str, dict[str, tuple[int, ...]]] = {}
    unexpected = []
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if match is None:
            unexpected.append(key)
            continue
        halves.setdefault(match["module"], {})[match["half"]] = shape
    if unexpected:
        raise AdapterError(
            f"{src.description}/{ADAPTER_WEIGHTS} holds tensors that are not LoRA A/B weights of a projection: "
            f"{', '.join(sorted(unexpected)[:8])}{' ...' if len(unexpected) > 8 else ''}; only plain LoRA on Linear "
            f"projections can be merged (embedding LoRA, DoRA magnitudes and saved modules cannot)")
    if not halves:
        raise AdapterError(f"{src.description}/{ADAPTER_WEIGHTS} holds no LoRA tensors; pass the adapter directory "
                           f"peft's save_pretrained wrote")
    modules: dict[str, tuple[str, int]] = {}
    problems = []
    for module, pair in sorted(halves.items()):
        checkpoint_key = f"{module}.weight"
        name = parameter_name(checkpoint_key)
        if not isinstance(name, str) or not _SUPPORTED.match(name) or name not in expected:
            problems.append(f"{module} (not a supported projection: LoRA may target q/k/v/o_proj, gate/up/down_proj "
                            f"and the vision tower's q/k/v/out_proj, fc1, fc2)")
            continue
        if set(pair) != {"A", "B"}:
            problems.append(f"{module} (has lora_{next(iter(pair))} but not its other half)")
            continue
        (out_features, in_features), a, b = expected[name], pair["A"], pair["B"]
        if len(a) != 2 or len(b) != 2 or a[1] != in_features or b[0] != out_features or a[0] != b[1] or a[0] < 1:
            problems.append(f"{module} (lora_A {a}, lora_B {b} do not fit its weight {expected[name]}: expected "
                            f"[r, {in_features}] and [{out_features}, r])")
            continue
        modules[name] = (checkpoint_key, a[0])
    if problems:
        raise AdapterError(f"adapter {src.description!r} does not fit this model: {'; '.join(problems[:6])}"
                           f"{f'; and {len(problems) - 6} more' if len(problems) > 6 else ''}. Use an adapter trained "
                           f"on this base model")
    targets = raw.get("target_modules")
    targets = (targets,) if isinstance(targets, str) else tuple(map(str, targets or ()))
    return LoraAdapter(description=src.description, revision=src.revision, rank=raw["r"],
                       ranks=tuple(sorted({r for _, r in modules.values()})), alpha=float(raw["lora_alpha"]),
                       use_rslora=bool(raw.get("use_rslora", False)), target_modules=targets, modules=modules,
                       base_model=raw.get("base_model_name_or_path"), files=(ADAPTER_CONFIG, ADAPTER_WEIGHTS),
                       source=src)


def adapter_deltas(adapter: LoraAdapter, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Our parameter name -> scale * B @ A in float32, for every projection the adapter changes."""
    src = adapter.source or CheckpointSource.open(adapter.description, storage_options)
    deltas = {}
    with tempfile.TemporaryDirectory(prefix="t5g2-adapter-") as scratch:
        path = src.local_path(ADAPTER_WEIGHTS)
        if path is None:  # remote: copy it to local disk, then memory-map it
            path = os.path.join(scratch, ADAPTER_WEIGHTS)
            src.fs.get(src.path(ADAPTER_WEIGHTS), path)
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as exc:
            raise AdapterError(f"{src.description}/{ADAPTER_WEIGHTS} is not a readable safetensors file: "
                               f"{exc}") from exc
        for name, (checkpoint_key, rank) in adapter.modules.items():
            module = checkpoint_key[: -len(".weight")]
            a = handle.get_tensor(f"base_model.model.{module}.lora_A.weight").float()  # [r, in]
            b = handle.get_tensor(f"base_model.model.{module}.lora_B.weight").float()  # [out, r]
            deltas[name] = (b @ a).mul_(adapter.scale(rank))  # [out, in]
    return deltas


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "LoraAdapter", "adapter_deltas", "read_adapter"]
