"""Image preprocessing for the T5Gemma 2 vision tower: encoded bytes -> float32 pixels [3, H, W].

Two steps, each usable alone:
  * `ImageProcessor.decode(data)`: untrusted bytes -> RGB `PIL.Image`, safely. Only allowlisted
    formats are parsed, the pixel count is checked from the header before any pixel is decoded,
    EXIF orientation is applied, and transparency is composited onto white. Every failure is an
    `ImageError` whose `kind` ("image_decode", "image_format", "image_too_large") lets the
    pipeline record a per-row error instead of stopping the job.
  * `ImageProcessor.preprocess(image)`: resize, rescale and normalize as the checkpoint's
    preprocessor_config.json says (the Gemma 3 / SigLIP image processor fields). For the same
    PIL image the pixels equal transformers' Gemma 3 processor (PIL backend) bit for bit: the same
    RGB conversion, the same Pillow resize on uint8 RGB, the same float64 rescale rounded to
    float32, the same float32 normalize.

Where the reference has two behaviours we pick one: its processor takes a PIL image as given
(no EXIF rotation, transparency onto white), while its `load_image` for files applies EXIF and
drops alpha without compositing. We apply EXIF and composite onto white.

Not here: the vision tower (siglip.py), prompt tokens for images (tokenizer.py), reading image
columns (operators/prepare.py). Pan-and-scan crops are not supported and are rejected.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .source import CheckpointError, CheckpointSource

PREPROCESSOR_FILE = "preprocessor_config.json"

# The formats image datasets carry, as Pillow names its parsers. Phone JPEGs with extra frames
# (Pillow reports them as "MPO") are read by the JPEG parser, so "JPEG" covers them.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Pillow's own default bomb limit (Image.MAX_IMAGE_PIXELS): about 89.5 megapixels, far above any
# photo we need at 896 px, yet small enough that one decoded image stays under ~270 MB of RGB.
DEFAULT_MAX_PIXELS = 89_478_485

# PIL resampling filters by the ints preprocessor_config.json stores.
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# Processor types whose preprocessing is resize -> rescale -> normalize at a fixed size; the
# "Fast"/"Pil" variants are the same math on other backends.
_KNOWN_PROCESSOR_TYPES = ("Gemma3ImageProcessor", "SiglipImageProcessor")


class ImageError(ValueError):
    """One image cannot be used; `kind` says why, for the per-row error column.

    kind: "image_decode" (empty, truncated, corrupt, undecodable),
          "image_format" (a format outside the allowlist, or not RGB-convertible as configured),
          "image_too_large" (more pixels than the configured limit: a possible decompression bomb).
    """

    KINDS = ("image_decode", "image_format", "image_too_large")

    def __init__(self, kind: str, message: str):
        assert kind in self.KINDS, kind
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What preprocessor_config.json says, plus our decoding limits. Defaults are Gemma 3's."""

    height: int = 896  # output height in pixels (size.height)
    width: int = 896  # output width in pixels (size.width)
    do_resize: bool = True  # resize to (height, width); off means inputs must already be that size
    resample: int = 2  # PIL filter id: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming
    do_rescale: bool = True  # multiply uint8 values by rescale_factor
    rescale_factor: float = 1 / 255  # 1/255 maps [0, 255] to [0, 1]
    do_normalize: bool = True  # (x - mean) / std per channel
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel mean, RGB order
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel std, RGB order
    do_convert_rgb: bool = True  # convert any mode to RGB (transparency onto white)
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse images with more pixels than this (width * height)
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS  # Pillow format names we agree to parse

    def __post_init__(self):
        for name in ("height", "width", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"image processor {name} must be a positive int, got {value!r}")
        if self.resample not in _RESAMPLE_NAMES:
            raise ValueError(
                f"image processor resample must be a PIL filter id 0-5 ({_RESAMPLE_NAMES}), got {self.resample!r}"
            )
        if not self.rescale_factor > 0:
            raise ValueError(f"image processor rescale_factor must be positive, got {self.rescale_factor!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"image processor {name} must have 3 values (R, G, B), got {value!r}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image processor image_std must be non-zero, got {self.image_std!r}")
        if not self.allowed_formats:
            raise ValueError("image processor allowed_formats is empty: no image could be read")
        Image.init()  # registers every plugin, so Image.OPEN lists all format names Pillow can read
        unknown = [f for f in self.allowed_formats if f not in Image.OPEN]
        if unknown:
            raise ValueError(
                f"allowed_formats names formats Pillow cannot open: {unknown}; use names from PIL.Image.OPEN"
            )


def config_from_dict(raw: dict[str, Any], *, where: str = PREPROCESSOR_FILE, **overrides) -> ImageProcessorConfig:
    """Parse a preprocessor_config.json dict; null fields take the Gemma 3 defaults.

    `overrides` set ImageProcessorConfig fields directly (e.g. max_pixels, allowed_formats).
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    kind = raw.get("image_processor_type")
    if kind is not None and not str(kind).startswith(_KNOWN_PROCESSOR_TYPES):
        raise CheckpointError(
            f"{where}: image_processor_type {kind!r} is not supported; this preprocessing implements "
            f"{' / '.join(_KNOWN_PROCESSOR_TYPES)} (resize, rescale, normalize). Use the checkpoint's "
            f"original preprocessor_config.json"
        )
    if raw.get("do_pan_and_scan"):
        raise CheckpointError(
            f"{where}: do_pan_and_scan is true, but pan-and-scan crops are not supported; set it to "
            f"false or null (the released T5Gemma 2 checkpoints leave it null)"
        )
    if raw.get("do_center_crop"):
        raise CheckpointError(
            f"{where}: do_center_crop is true, which Gemma 3 preprocessing never does; set it to false"
        )
    defaults = ImageProcessorConfig()
    values: dict[str, Any] = {}
    size = raw.get("size")
    if size is not None:
        if not isinstance(size, dict) or "height" not in size or "width" not in size:
            raise CheckpointError(
                f"{where}: size must be {{'height': H, 'width': W}} (Gemma 3 resizes to a fixed square), got {size!r}"
            )
        values["height"], values["width"] = size["height"], size["width"]
    for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if raw.get(name) is not None:  # null means "the processor's default", which is ours
            values[name] = bool(raw[name])
    if raw.get("resample") is not None:
        values["resample"] = raw["resample"]
    if raw.get("rescale_factor") is not None:
        values["rescale_factor"] = float(raw["rescale_factor"])
    for name in ("image_mean", "image_std"):
        value = raw.get(name)
        if value is None:
            continue
        # A single number means the same value for every channel, as transformers reads it.
        values[name] = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3
    values.update(overrides)
    try:
        return replace(defaults, **values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


class ImageProcessor:
    """Decodes and preprocesses images for one checkpoint. Holds no per-image state; thread-safe
    except for Pillow's process-wide warning filter while a header is opened (see `decode`)."""

    def __init__(self, config: ImageProcessorConfig | None = None):
        self.config = config or ImageProcessorConfig()
        c = self.config
        # float32 arrays, as the reference normalizes in float32.
        self._mean = np.asarray(c.image_mean, dtype=np.float32)
        self._std = np.asarray(c.image_std, dtype=np.float32)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides) -> ImageProcessor:
        """From a preprocessor_config.json dict; `overrides` set ImageProcessorConfig fields."""
        return cls(config_from_dict(raw, **overrides))

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike | CheckpointSource,
        storage_options: dict | None = None,
        **overrides,
    ) -> ImageProcessor:
        """From the checkpoint's preprocessor_config.json; when the file is absent, Gemma 3's defaults
        at the side the checkpoint's vision tower takes (config.json), or 896 without a config."""
        src = source if isinstance(source, CheckpointSource) else CheckpointSource.open(source, storage_options)
        if not src.exists(PREPROCESSOR_FILE):
            # Text-only copies of a checkpoint often drop this file; the defaults are the released ones.
            if src.exists("config.json") and not {"height", "width"} & set(overrides):
                from .config import T5Gemma2Config

                side = T5Gemma2Config.from_json_text(src.read_bytes("config.json")).vision.image_size
                overrides = {"height": side, "width": side, **overrides}
            return cls(replace(ImageProcessorConfig(), **overrides))
        where = f"{src.description}/{PREPROCESSOR_FILE}"
        try:
            raw = json.loads(src.read_bytes(PREPROCESSOR_FILE))
        except json.JSONDecodeError as exc:
            raise CheckpointError(
                f"{where} is not valid JSON ({exc}); restore it from the original checkpoint"
            ) from exc
        return cls(config_from_dict(raw, where=where, **overrides))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the output pixels."""
        return self.config.height, self.config.width

    # ---- decoding -------------------------------------------------------------------------

    def decode(self, data: bytes | bytearray | memoryview) -> Image.Image:
        """Untrusted encoded bytes -> an RGB PIL image with EXIF orientation applied.

        Raises ImageError: "image_decode" for empty/corrupt/truncated data, "image_format" for a
        format outside `allowed_formats`, "image_too_large" when width * height > max_pixels.
        Only the first frame of animated images is used.
        """
        c = self.config
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageError("image_decode", f"image must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if not data:
            raise ImageError("image_decode", "image is empty (0 bytes)")
        image = self._open(data)
        width, height = image.size
        if width * height > c.max_pixels:
            raise ImageError(
                "image_too_large",
                f"{image.format} image is {width}x{height} = {width * height} pixels, more than max_pixels="
                f"{c.max_pixels}; refusing to decode it (a possible decompression bomb). Raise max_pixels "
                f"if such images are expected",
            )
        try:
            image.seek(0)  # first frame of an animation; a no-op for still images
            image.load()  # decode now: truncation and corruption surface here, not later
            # Cameras store pixels unrotated plus an orientation tag; viewers (and people who
            # wrote captions) see the rotated image, so the model should too.
            image = ImageOps.exif_transpose(image)
        except ImageError:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
            raise ImageError(
                "image_decode", f"cannot decode {image.format} image: {type(exc).__name__}: {exc}"
            ) from exc
        return self.to_rgb(image)

    def _open(self, data: bytes) -> Image.Image:
        """Open the header with only the allowlisted format parsers; classify failures."""
        c = self.config
        # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that, both while reading
        # the header. Our limit is checked right after; the warning becomes an error only where our
        # limit is not larger than Pillow's, so a user who raised max_pixels is not refused early.
        action = "error" if c.max_pixels <= Image.MAX_IMAGE_PIXELS else "ignore"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(action, Image.DecompressionBombWarning)
                return Image.open(io.BytesIO(data), formats=list(c.allowed_formats))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(
                "image_too_large",
                f"image exceeds the decompression-bomb limit ({exc}); max_pixels={c.max_pixels}",
            ) from exc
        except Image.UnidentifiedImageError:
            pass
        except Exception as exc:  # a recognised format whose header is broken
            raise ImageError("image_decode", f"cannot read image header: {type(exc).__name__}: {exc}") from exc
        # Not an allowed format: name what it is, if any parser recognises the header, so the
        # error says "TIFF is not allowed" rather than "corrupt". Header parsing only, no decode.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                found = Image.open(io.BytesIO(data)).format
        except Exception:
            found = None
        if found:
            raise ImageError(
                "image_format",
                f"image format {found} is not allowed (allowed: {', '.join(c.allowed_formats)}); convert "
                f"it to one of those, or add it to allowed_formats",
            )
        raise ImageError(
            "image_decode",
            f"bytes are not a recognizable image ({len(data)} bytes, starting {data[:8]!r})",
        )

    def to_rgb(self, image: Image.Image) -> Image.Image:
        """Any PIL mode -> RGB, as the reference processor converts: transparency onto white."""
        # Palette and RGB/L images may carry transparency in info rather than in an alpha band.
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if image.mode == "RGB" and not has_alpha:
            return image
        if not self.config.do_convert_rgb:
            if image.mode == "RGB":
                return image  # kept as is, transparency ignored, as the reference does
            raise ImageError(
                "image_format",
                f"image mode is {image.mode}, not RGB, and preprocessor_config.json sets do_convert_rgb: "
                f"false; the vision tower needs 3 channels (set do_convert_rgb to true or null)",
            )
        try:
            if has_alpha:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return image.convert("RGB")  # L, P, CMYK, YCbCr, I;16, ... by Pillow's own rules
        except Exception as exc:
            raise ImageError("image_decode", f"cannot convert {image.mode} image to RGB: {exc}") from exc

    # ---- preprocessing --------------------------------------------------------------------

    def preprocess(self, image: Image.Image | bytes | bytearray | memoryview) -> torch.Tensor:
        """One image (encoded bytes, or a PIL image taken as given) -> float32 [3, H, W].

        Bytes go through `decode` (EXIF orientation applied). A PIL image is only converted to RGB,
        exactly as the reference processor treats a PIL image it is handed.
        """
        c = self.config
        pixels = self.resize(image).numpy().transpose(1, 2, 0)  # [H, W, 3] uint8
        if c.do_rescale:
            # float64 product rounded once to float32, as the reference computes it.
            pixels = (pixels.astype(np.float64) * c.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if c.do_normalize:
            pixels = (pixels - self._mean) / self._std  # float32 throughout
        # [H, W, 3] -> [3, H, W], contiguous so torch owns plain strides.
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def resize(self, image: Image.Image | bytes | bytearray | memoryview) -> torch.Tensor:
        """The first half of `preprocess`: decoded (or converted to RGB) and resized -> uint8 [3, H, W].

        What the pipeline ships from its CPU stage (a quarter of float32's bytes); `normalizer()`
        finishes it on the model's device, equal to `preprocess` bit for bit."""
        c = self.config
        if isinstance(image, Image.Image):
            image = self.to_rgb(image)
        else:
            image = self.decode(image)
        if c.do_resize:
            # Always through Pillow, even at the target size, as the reference does.
            image = image.resize((c.width, c.height), resample=Image.Resampling(c.resample))
        elif image.size != (c.width, c.height):
            raise ImageError(
                "image_format",
                f"image is {image.size[0]}x{image.size[1]} but do_resize is false and the vision tower "
                f"needs {c.width}x{c.height}",
            )
        return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))  # [3, H, W] uint8

    def normalizer(self) -> PixelNormalizer:
        """The second half of `preprocess` (rescale, normalize) for uint8 pixels from `resize`."""
        c = self.config
        values = np.arange(256, dtype=np.uint8)[:, None].repeat(3, 1)  # [256, 3]: every value, every channel
        if c.do_rescale:
            table = (values.astype(np.float64) * c.rescale_factor).astype(np.float32)  # as preprocess rounds
        else:
            table = values.astype(np.float32)
        if c.do_normalize:
            table = (table - self._mean) / self._std
        return PixelNormalizer(torch.from_numpy(np.ascontiguousarray(table.T)))  # [3, 256]

    __call__ = preprocess

    def preprocess_batch(self, images: list[Image.Image | bytes]) -> torch.Tensor:
        """Several images -> float32 [N, 3, H, W]. The first bad image raises its ImageError;
        callers that need per-row errors call `preprocess` per row."""
        if not images:
            return torch.empty((0, 3, self.config.height, self.config.width), dtype=torch.float32)
        return torch.stack([self.preprocess(image) for image in images])


class PixelNormalizer:
    """uint8 pixels [N, 3, H, W] -> float32, by a table of what `ImageProcessor.preprocess` gives each of
    the 256 values per channel: rescale and normalize are per-value functions, so a lookup reproduces
    them exactly on any device, where recomputing them in float32 would round differently (preprocess
    rounds a float64 product)."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [3, 256] float32

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] on any device -> float32 there."""
        table = self.table.to(pixels.device)
        offsets = torch.arange(table.shape[0], device=pixels.device, dtype=torch.int32).mul_(256)
        index = pixels.to(torch.int32).add_(offsets.view(1, -1, 1, 1))  # value + 256 x channel
        return table.view(-1)[index]


__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "ImageProcessor",
    "ImageProcessorConfig",
    "PixelNormalizer",
    "config_from_dict",
]
