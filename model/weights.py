"""Load a T5Gemma 2 checkpoint (Hugging Face layout, safetensors only) into our module.

`load_pretrained(source)` reads config.json and model.safetensors (or the shards named
by model.safetensors.index.json) from a local directory, an fsspec URI or a hub id, and
maps every tensor to exactly one parameter: missing, unexpected or wrongly shaped tensors
fail with their names listed. Pickle checkpoints are refused, never opened: unpickling can
run arbitrary code.

Checkpoint key layouts differ between transformers versions (`encoder.text_model.layers`
vs `encoder.layers`, `vision_tower.vision_model.encoder` vs `vision_tower.encoder`);
`_RENAMES` folds them all onto our names. Projections the model runs as one matmul
(`FusedLinear`: q|k|v, gate|up) stay separate tensors in checkpoints: `fused_parts` says which
rows of a fused parameter each checkpoint tensor fills, for loading and for writing.

Lenient only where transformers is: with `vision_use_head` true, the tensors of SigLIP's pooling
head (`_VISION_HEAD`, which T5Gemma 2 never runs) are skipped with a warning naming them; any
other tensor we do not use is still refused. `load_config` applies generation_config.json's token
ids over config.json's (config.GenerationDefaults). With `adapter`, a PEFT LoRA adapter is merged
into the checkpoint's tensors as they are read, before q|k|v and gate|up are joined (adapter.py).

Not here: the model math (t5gemma2.py), tokenizer and image settings (tokenizer.py, images.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile

import torch
from safetensors import safe_open

from .adapter import LoraAdapter, adapter_deltas, read_adapter
from .config import GENERATION_CONFIG_FILE, GenerationDefaults, T5Gemma2Config
from .layers import FusedLinear
from .source import CheckpointError, CheckpointSource
from .t5gemma2 import T5Gemma2

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# (checkpoint key pattern, our name). First match wins; None drops a tied duplicate.
_RENAMES: list[tuple[re.Pattern, str | None]] = [
    (re.compile(p), r) for p, r in [
        (r"^model\.encoder\.(?:text_model\.)?embed_tokens\.(weight|eoi_embedding)$", r"embed_tokens.\1"),
        (r"^model\.decoder\.embed_tokens\.(weight|eoi_embedding)$", None),  # tied to the encoder's
        (r"^lm_head\.out_proj\.weight$", None),  # tied to the embedding table
        (r"^model\.encoder\.(?:text_model\.)?(layers\..+|norm\.weight)$", r"encoder.\1"),
        (r"^model\.decoder\.(layers\..+|norm\.weight)$", r"decoder.\1"),
        (r"^model\.encoder\.vision_tower\.(?:vision_model\.)?embeddings\.(patch_embedding|position_embedding)\.(.+)$",
         r"vision_tower.\1.\2"),
        (r"^model\.encoder\.vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.(?:self_attn|mlp)\.(.+)$",
         r"vision_tower.layers.\1.\2"),
        (r"^model\.encoder\.vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.(layer_norm[12]\..+)$",
         r"vision_tower.layers.\1.\2"),
        (r"^model\.encoder\.vision_tower\.(?:vision_model\.)?post_layernorm\.(.+)$", r"vision_tower.post_layernorm.\1"),
        (r"^model\.encoder\.multi_modal_projector\.(.+)$", r"projector.\1"),
    ]
]
_NO_MATCH = object()
# SigLIP's attention-pooling head (SiglipMultiheadAttentionPoolingHead): present when vision_use_head
# is true, never run by T5Gemma 2. Only these names are skipped; anything else unknown is refused.
_VISION_HEAD = re.compile(
    r"^model\.encoder\.vision_tower\.(?:vision_model\.)?head\."
    r"(?:probe|attention\.(?:in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
    r"|layernorm\.(?:weight|bias)|mlp\.fc[12]\.(?:weight|bias))$"
)

log = logging.getLogger(__name__)


def is_unused_head_tensor(config: T5Gemma2Config, checkpoint_key: str) -> bool:
    """A tensor of SigLIP's pooling head, skipped because config.json says the checkpoint has one."""
    return config.vision.has_unused_head and _VISION_HEAD.match(checkpoint_key) is not None


def skipped_head_warning(keys: list[str]) -> str:
    return (f"skipped {len(keys)} tensor(s) of SigLIP's pooling head (vision_use_head is true; T5Gemma 2 never runs "
            f"it, as in transformers): {', '.join(sorted(keys))}")


def parameter_name(checkpoint_key: str):
    """Our parameter name for a checkpoint key, None for a tied duplicate, _NO_MATCH if unknown."""
    for pattern, target in _RENAMES:
        if pattern.match(checkpoint_key):
            return None if target is None else pattern.sub(target, checkpoint_key)
    return _NO_MATCH


def fused_parts(model: T5Gemma2) -> dict[str, tuple[str, int, int]]:
    """Per separate projection name (as checkpoints hold it, in our naming): (fused parameter, first row, end row)."""
    parts = {}
    for prefix, module in model.named_modules():
        if isinstance(module, FusedLinear):
            parent = prefix.rsplit(".", 1)[0]
            start = 0
            for part, rows in module.parts.items():
                for tensor in ("weight", "bias") if module.bias is not None else ("weight",):
                    parts[f"{parent}.{part}.{tensor}"] = (f"{prefix}.{tensor}", start, start + rows)
                start += rows
    return parts


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported: use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_config(source: str | os.PathLike | CheckpointSource, storage_options: dict | None = None) -> T5Gemma2Config:
    """config.json, with generation_config.json's token ids over its own where that file is present."""
    src = source if isinstance(source, CheckpointSource) else CheckpointSource.open(source, storage_options)
    if not src.exists("config.json"):
        raise CheckpointError(f"checkpoint {src.description!r} has no config.json: pass the model directory itself")
    config = T5Gemma2Config.from_json_text(src.read_bytes("config.json"), where=f"{src.description}/config.json")
    if src.exists(GENERATION_CONFIG_FILE):
        generation = GenerationDefaults.from_json_text(src.read_bytes(GENERATION_CONFIG_FILE),
                                                       where=f"{src.description}/{GENERATION_CONFIG_FILE}",
                                                       vocab_size=config.vocab_size)
        config = config.with_generation_config(generation)
    return config


def expected_shapes(model: T5Gemma2) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, int, int]]]:
    """(our parameter name -> shape as checkpoints hold it, fused_parts): fused weights listed as their parts."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    fused = fused_parts(model)
    for name, (target, start, end) in fused.items():  # checkpoints hold the parts, not the fused tensor
        expected[name] = (end - start, *expected[target][1:])
    for target in {target for target, _, _ in fused.values()}:
        del expected[target]
    return expected, fused


def inspect_adapter(adapter: str | os.PathLike | CheckpointSource, config: T5Gemma2Config,
                    storage_options: dict | None = None) -> LoraAdapter:
    """Check a LoRA adapter against a model config (headers only, no tensors read)."""
    with torch.device("meta"):
        expected, _ = expected_shapes(T5Gemma2(config))
    return read_adapter(adapter, expected, parameter_name, storage_options)


def weight_files(src: CheckpointSource) -> list[str]:
    """Names of the safetensors files holding the weights; refuses pickle-only checkpoints."""
    files = src.files()
    if "model.safetensors.index.json" in files:
        try:
            index = json.loads(src.read_bytes("model.safetensors.index.json"))
            shards = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{src.description}/model.safetensors.index.json is malformed ({exc}): it needs a 'weight_map' "
                f"of tensor name -> shard file"
            ) from exc
        not_safetensors = [s for s in shards if not str(s).endswith(".safetensors")]
        if not_safetensors:
            raise CheckpointError(
                f"{src.description}/model.safetensors.index.json names shards that are not safetensors files "
                f"({', '.join(map(str, not_safetensors))}); only safetensors weights are loaded (pickle files can "
                f"run code when loaded). Convert them to safetensors in a trusted environment"
            )
        missing = [s for s in shards if s not in files]
        if missing:
            raise CheckpointError(f"checkpoint {src.description!r} index names shards that are absent: {missing}")
        return shards
    if "model.safetensors" in files:
        return ["model.safetensors"]
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"checkpoint {src.description!r} has only pickle weights ({', '.join(pickles)}); pickle files can run "
            f"code when loaded, so they are refused. Convert them to safetensors (save_pretrained with "
            f"safe_serialization=True) in a trusted environment"
        )
    raise CheckpointError(f"checkpoint {src.description!r} has no model.safetensors (or sharded index)")


def load_pretrained(
    source: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    storage_options: dict | None = None,
    adapter: str | os.PathLike | None = None,
    adapter_storage_options: dict | None = None,
) -> T5Gemma2:
    """Build the model from a checkpoint directory, fsspec URI or hub id, in eval mode.

    `adapter`: a PEFT LoRA adapter directory (local, fsspec URI or hub id) merged into the weights
    (adapter.py); `adapter_storage_options` are its fsspec options (default: `storage_options`).
    """
    torch_dtype = resolve_dtype(dtype)
    src = CheckpointSource.open(source, storage_options)
    config = load_config(src)
    for warning in config.warnings:
        log.warning(warning)
    shards = weight_files(src)
    with torch.device("meta"):
        model = T5Gemma2(config)
    expected, fused = expected_shapes(model)
    lora = None
    deltas: dict[str, torch.Tensor] = {}
    if adapter is not None:
        options = storage_options if adapter_storage_options is None else adapter_storage_options
        lora = read_adapter(adapter, expected, parameter_name, options)
        deltas = adapter_deltas(lora, options)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    skipped: list[str] = []
    wrong_shape: list[str] = []
    wrong_shape_names: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="t5g2-weights-") as scratch:
        for shard in shards:
            path = src.local_path(shard)
            if path is None:  # remote: copy the shard to local disk once, then memory-map it
                path = os.path.join(scratch, shard)
                src.fs.get(src.path(shard), path)
            try:
                handle = safe_open(path, framework="pt", device="cpu")
            except Exception as exc:
                raise CheckpointError(f"{src.description}/{shard} is not a readable safetensors file: {exc}") from exc
            for key in handle.keys():
                name = parameter_name(key)
                if name is None:
                    continue
                if name is _NO_MATCH or name not in expected:
                    (skipped if is_unused_head_tensor(config, key) else unexpected).append(key)
                    continue
                tensor = handle.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[name]):
                    wrong_shape.append(f"{key} {tuple(tensor.shape)} != expected {tuple(expected[name])}")
                    wrong_shape_names.add(name)
                    continue
                if name in deltas:  # W + scale * B @ A, in float32, before the cast and before fusing
                    tensor = tensor.float() + deltas.pop(name)
                state[name] = tensor.to(device=device, dtype=torch_dtype)
            if src.local_path(shard) is None:
                os.remove(path)  # keep at most one remote shard on disk at a time
    missing = sorted(set(expected) - set(state) - wrong_shape_names)
    problems = []
    if missing:
        problems.append(f"missing tensors (for our parameters): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if wrong_shape:
        problems.append(f"tensors with the wrong shape: {'; '.join(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {src.description!r} does not match its config.json: " + " | ".join(problems)
        )
    if skipped:
        log.warning(skipped_head_warning(skipped))
    for target in sorted({target for target, _, _ in fused.values()}):
        names = sorted((n for n, (t, _, _) in fused.items() if t == target), key=lambda n: fused[n][1])
        state[target] = torch.cat([state.pop(n) for n in names])
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers()
    model.source = src.description
    model.revision = src.revision
    model.adapter = lora
    model.skipped_tensors = tuple(sorted(skipped))
    return model.eval()



def checkpoint_key(name: str) -> str:
    """The Hugging Face checkpoint key for one of our parameter names (inverse of _RENAMES)."""
    rules = [
        (r"^embed_tokens\.(.+)$", r"model.encoder.embed_tokens.\1"),
        (r"^(encoder|decoder)\.(.+)$", r"model.\1.\2"),
        (r"^vision_tower\.(patch_embedding|position_embedding)\.(.+)$", r"model.encoder.vision_tower.embeddings.\1.\2"),
        (r"^vision_tower\.layers\.(\d+)\.([qkv]_proj|out_proj)\.(.+)$",
         r"model.encoder.vision_tower.encoder.layers.\1.self_attn.\2.\3"),
        (r"^vision_tower\.layers\.(\d+)\.(fc[12])\.(.+)$", r"model.encoder.vision_tower.encoder.layers.\1.mlp.\2.\3"),
        (r"^vision_tower\.layers\.(\d+)\.(layer_norm[12])\.(.+)$",
         r"model.encoder.vision_tower.encoder.layers.\1.\2.\3"),
        (r"^vision_tower\.post_layernorm\.(.+)$", r"model.encoder.vision_tower.post_layernorm.\1"),
        (r"^projector\.(.+)$", r"model.encoder.multi_modal_projector.\1"),
    ]
    for pattern, target in rules:
        if re.match(pattern, name):
            return re.sub(pattern, target, name)
    raise KeyError(f"no checkpoint key for parameter {name!r}")


def save_pretrained(model: T5Gemma2, directory: str | os.PathLike) -> None:
    """Write config.json and model.safetensors in the Hugging Face layout (loadable by transformers)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = model.state_dict()
    fused = fused_parts(model)
    for name, (target, start, end) in fused.items():
        # cloned: safetensors refuses tensors that share storage, as the parts of one fused tensor do
        state[name] = state[target][start:end].detach().to("cpu", copy=True)
    for target in {target for target, _, _ in fused.values()}:
        del state[target]
    tensors = {checkpoint_key(name): t.detach().contiguous().cpu() for name, t in state.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(model.config.to_hf_dict(), handle, indent=2)


def random_model(
    config: T5Gemma2Config, seed: int = 0, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> T5Gemma2:
    """A model with seeded random weights at the config's shapes (demo and benchmark checkpoints).

    Matrices get std 1/sqrt(fan_in) so activations stay in range through many layers; norm
    weights and vectors get small values around zero (Gemma norms scale by 1 + weight).
    """
    torch_dtype = resolve_dtype(dtype)
    with torch.device(device):
        model = T5Gemma2(config).to(torch_dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            fan_in = param.shape[-1] if param.dim() > 1 else 1
            std = fan_in ** -0.5 if param.dim() > 1 else 0.1
            param.copy_(torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32).mul_(std))
    return model.eval()
