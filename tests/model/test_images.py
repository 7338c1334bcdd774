"""model/images.py against transformers' Gemma 3 processor, plus safe decoding of bad bytes.

Reference: `Gemma3Processor` over `Gemma3ImageProcessorPil` (transformers 5.24's PIL backend,
models/gemma3/image_processing_pil_gemma3.py), loaded from the same preprocessor_config.json. The
torchvision-based `Gemma3ImageProcessor` cannot be imported here (no torchvision). The processor,
not the bare image processor, is the reference because it is what the model is used with: it turns
preprocessor_config.json's `do_convert_rgb: null` into true, the bare one into "no conversion".
Tolerance: none. Both sides resize the same uint8 RGB image with the same Pillow call, rescale in
float64 rounded to float32 and normalize in float32, so the pixels are compared for equality.

EXIF: the processor takes a PIL image as given and does not apply EXIF orientation (transformers'
`load_image`, used for paths and URLs, does). We apply it when decoding bytes, so the EXIF test
compares against the processor fed the already-transposed image, and against `load_image`.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import Gemma3Processor, GemmaTokenizer
from transformers.image_utils import load_image
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from model.images import DEFAULT_FORMATS, ImageError, ImageProcessor, ImageProcessorConfig, config_from_dict
from model.source import CheckpointError
from tests.helpers.spm import train_sentencepiece

# Non-square so a height/width swap cannot pass.
HEIGHT, WIDTH = 48, 64

# As the released Gemma 3 / T5Gemma 2 preprocessor_config.json writes it (nulls included), at a
# small size.
PREPROCESSOR = {
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_pan_and_scan": None,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Gemma3ImageProcessor",
    "image_seq_length": 4,
    "image_std": [0.5, 0.5, 0.5],
    "pan_and_scan_max_num_crops": None,
    "pan_and_scan_min_crop_size": None,
    "pan_and_scan_min_ratio_to_activate": None,
    "processor_class": "Gemma3Processor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": HEIGHT, "width": WIDTH},
}


def make_dir(directory, raw):
    train_sentencepiece(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(raw))
    return directory


def reference(directory):
    tokenizer = GemmaTokenizer.from_pretrained(
        directory,
        add_bos_token=True,
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    image_processor = Gemma3ImageProcessorPil.from_pretrained(directory)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4)

    def pixels(images):
        return processor(images=[list(images)], return_tensors="np")["pixel_values"]

    return pixels


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_dir(tmp_path_factory.mktemp("img"), PREPROCESSOR)


@pytest.fixture(scope="module")
def ours(ckpt):
    return ImageProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def ref(ckpt):
    return reference(ckpt)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(shape, seed=0) -> np.ndarray:
    # Smooth gradient plus noise: resampling filters see both edges and flat areas.
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    base = (np.add.outer(np.arange(h) * 3, np.arange(w) * 2) % 256).astype(np.int64)
    base = base.reshape(h, w, *([1] * (len(shape) - 2)))
    return ((base + rng.integers(0, 64, shape)) % 256).astype(np.uint8)


def palette_with_transparency() -> Image.Image:
    image = Image.fromarray(noise((40, 50, 3), seed=3)).quantize(colors=16)
    image.info["transparency"] = 0  # palette index 0 is transparent
    return image


def rgb_with_trns() -> Image.Image:
    array = noise((30, 30, 3), seed=4)
    array[:10, :10] = (1, 2, 3)
    image = Image.fromarray(array)
    image.info["transparency"] = (1, 2, 3)  # a tRNS colour key, no alpha band
    return image


# (name, encoded bytes): modes, sizes and formats the pipeline meets.
CASES = [
    ("rgb_png_large", lambda: encode(Image.fromarray(noise((300, 257, 3))), "PNG")),
    ("rgb_png_small", lambda: encode(Image.fromarray(noise((17, 9, 3), 1)), "PNG")),
    ("rgb_png_exact_size", lambda: encode(Image.fromarray(noise((HEIGHT, WIDTH, 3), 2)), "PNG")),
    ("rgb_jpeg", lambda: encode(Image.fromarray(noise((120, 90, 3), 5)), "JPEG", quality=90)),
    ("rgba_png", lambda: encode(Image.fromarray(noise((70, 100, 4), 6), "RGBA"), "PNG")),
    ("la_png", lambda: encode(Image.fromarray(noise((33, 44, 2), 7), "LA"), "PNG")),
    ("gray_png", lambda: encode(Image.fromarray(noise((50, 61), 8), "L"), "PNG")),
    ("gray16_png", lambda: encode(Image.fromarray(noise((20, 30), 9).astype(np.uint16) * 300), "PNG")),
    ("gray_jpeg", lambda: encode(Image.fromarray(noise((64, 64), 10), "L"), "JPEG")),
    ("palette_gif", lambda: encode(Image.fromarray(noise((40, 50, 3), 11)).quantize(colors=32), "GIF")),
    ("palette_gif_transparent", lambda: encode(palette_with_transparency(), "GIF", transparency=0)),
    ("palette_png_transparent", lambda: encode(palette_with_transparency(), "PNG", transparency=0)),
    ("rgb_png_trns", lambda: encode(rgb_with_trns(), "PNG", transparency=(1, 2, 3))),
    ("cmyk_jpeg", lambda: encode(Image.fromarray(noise((40, 40, 4), 12), "CMYK"), "JPEG")),
    ("one_bit_bmp", lambda: encode(Image.fromarray(noise((30, 30), 13) > 128), "BMP")),
    ("rgb_webp", lambda: encode(Image.fromarray(noise((60, 80, 3), 14)), "WEBP", lossless=True)),
    ("rgba_webp", lambda: encode(Image.fromarray(noise((60, 80, 4), 15), "RGBA"), "WEBP", lossless=True)),
    ("rgb_tiff", lambda: encode(Image.fromarray(noise((25, 35, 3), 16)), "TIFF")),
    ("rgb_bmp", lambda: encode(Image.fromarray(noise((25, 35, 3), 17)), "BMP")),
    ("animated_gif", lambda: animated_gif()),  # the first frame is the image
    ("mpo_jpeg", lambda: mpo()),  # phone JPEGs with extra frames: Pillow calls them MPO
]


def mpo() -> bytes:
    frames = [Image.fromarray(noise((30, 40, 3), seed=60 + i)) for i in range(2)]
    return encode(frames[0], "MPO", save_all=True, append_images=frames[1:])


def animated_gif() -> bytes:
    frames = [Image.fromarray(noise((30, 40, 3), seed=50 + i)).quantize(colors=16) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
def test_pixels_equal_reference(ours, ref, name, make):
    data = make()
    expected = ref([Image.open(io.BytesIO(data))])[0]
    got = ours.preprocess(data)
    assert got.dtype == torch.float32 and tuple(got.shape) == (3, HEIGHT, WIDTH)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_transparency_is_composited_onto_white(ours):
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    pixels = ours.preprocess(encode(transparent, "PNG"))
    assert torch.all(pixels == 1.0)  # white, normalized with mean 0.5 / std 0.5


def test_exif_orientation_is_applied(ours, ref, tmp_path):
    # Landscape pixels tagged "rotate 90° clockwise to view" (orientation 6): viewers show portrait.
    array = noise((40, 90, 3), seed=20)
    array[:, :10] = (255, 0, 0)  # a red stripe on the left edge of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert upright.size == (40, 90)

    got = ours.preprocess(data).numpy()
    np.testing.assert_array_equal(got, ref([upright])[0])
    # transformers' own loader for files applies EXIF too.
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    np.testing.assert_array_equal(got, ref([load_image(str(path))])[0])
    # ... while the processor handed the raw image does not, so the test tells them apart.
    assert not np.array_equal(got, ref([Image.open(io.BytesIO(data))])[0])
    decoded = ours.decode(data)
    assert decoded.size == (40, 90) and decoded.mode == "RGB"


def test_pil_input_is_taken_as_given(ours, ref):
    image = Image.fromarray(noise((50, 40, 4), seed=21), "RGBA")
    np.testing.assert_array_equal(ours.preprocess(image).numpy(), ref([image])[0])


def test_batch(ours, ref):
    datas = [make() for _, make in CASES[:5]]
    batch = ours.preprocess_batch(datas)
    assert tuple(batch.shape) == (5, 3, HEIGHT, WIDTH) and batch.dtype == torch.float32
    np.testing.assert_array_equal(batch.numpy(), ref([Image.open(io.BytesIO(d)) for d in datas]))
    assert tuple(ours.preprocess_batch([]).shape) == (0, 3, HEIGHT, WIDTH)


@pytest.mark.parametrize("resample", [0, 1, 2, 3, 4, 5])
def test_every_resample_filter_equals_reference(tmp_path, resample):
    directory = make_dir(tmp_path, {**PREPROCESSOR, "resample": resample})
    data = encode(Image.fromarray(noise((77, 131, 3), seed=resample)), "PNG")
    np.testing.assert_array_equal(
        ImageProcessor.from_pretrained(directory).preprocess(data).numpy(),
        reference(directory)([Image.open(io.BytesIO(data))])[0],
    )


def test_other_fields_equal_reference(tmp_path):
    raw = {**PREPROCESSOR, "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711], "rescale_factor": 0.5 / 255, "do_convert_rgb": True}
    directory = make_dir(tmp_path, raw)
    data = encode(Image.fromarray(noise((64, 48, 3), seed=30)), "PNG")
    np.testing.assert_array_equal(
        ImageProcessor.from_pretrained(directory).preprocess(data).numpy(),
        reference(directory)([Image.open(io.BytesIO(data))])[0],
    )


def test_defaults_without_preprocessor_config(tmp_path):
    train_sentencepiece(tmp_path)
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert processor.config == ImageProcessorConfig()
    assert processor.size == (896, 896)
    c = processor.config
    assert (c.resample, c.rescale_factor, c.image_mean, c.image_std) == (2, 1 / 255, (0.5,) * 3, (0.5,) * 3)
    # The released config's nulls mean the same defaults.
    assert config_from_dict({**PREPROCESSOR, "size": {"height": 896, "width": 896}}) == ImageProcessorConfig()


def test_overrides(ckpt):
    processor = ImageProcessor.from_pretrained(ckpt, max_pixels=1000, allowed_formats=("PNG",))
    assert processor.config.max_pixels == 1000 and processor.size == (HEIGHT, WIDTH)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"do_pan_and_scan": True}, "do_pan_and_scan is true"),
        ({"size": {"shortest_edge": 224}}, "size must be"),
        ({"resample": 9}, "resample must be"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must have 3"),
        ({"image_processor_type": "CLIPImageProcessor"}, "image_processor_type 'CLIPImageProcessor'"),
    ],
)
def test_unsupported_preprocessor_config(tmp_path, change, match):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, **change}))
    with pytest.raises(CheckpointError, match=match):
        ImageProcessor.from_pretrained(tmp_path)


def test_invalid_preprocessor_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ImageProcessor.from_pretrained(tmp_path)


# ---- bad bytes -----------------------------------------------------------------------------


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height: what a decompression bomb looks like
    before decoding."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def assert_kind(processor, data, kind, match=None):
    with pytest.raises(ImageError, match=match) as info:
        processor.preprocess(data)
    assert info.value.kind == kind
    return info.value


def test_empty_bytes(ours):
    assert_kind(ours, b"", "image_decode", "empty")


def test_garbage_bytes(ours):
    assert_kind(ours, b"this is not an image at all" * 4, "image_decode", "not a recognizable image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated(ours, fmt):
    data = encode(Image.fromarray(noise((200, 200, 3), seed=40)), fmt)
    assert_kind(ours, data[: len(data) // 2], "image_decode")


def test_corrupt_png_data(ours):
    data = bytearray(encode(Image.fromarray(noise((64, 64, 3), seed=41)), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start : start + 64] = bytes(64)  # zeroes in the compressed stream: CRC and zlib errors
    assert_kind(ours, bytes(data), "image_decode")


def test_header_only(ours):
    assert_kind(ours, encode(Image.new("RGB", (10, 10)), "PNG")[:40], "image_decode")


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX"])
def test_format_outside_allowlist(ours, fmt):
    error = assert_kind(ours, encode(Image.new("RGB", (16, 16)), fmt), "image_format", "not allowed")
    assert fmt in str(error)


def test_allowlist_is_configurable(ckpt):
    png_only = ImageProcessor.from_pretrained(ckpt, allowed_formats=("PNG",))
    assert_kind(png_only, encode(Image.new("RGB", (16, 16)), "JPEG"), "image_format", "JPEG is not allowed")
    assert png_only.preprocess(encode(Image.new("RGB", (16, 16)), "PNG")).shape == (3, HEIGHT, WIDTH)
    assert "TIFF" in DEFAULT_FORMATS and "ICO" not in DEFAULT_FORMATS


def test_decompression_bomb_over_our_limit(ckpt):
    small_limit = ImageProcessor.from_pretrained(ckpt, max_pixels=1_000_000)
    assert_kind(small_limit, png_with_declared_size(5000, 5000), "image_too_large", "max_pixels=1000000")
    assert small_limit.preprocess(encode(Image.new("RGB", (1000, 1000)), "PNG")).shape == (3, HEIGHT, WIDTH)


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["pillow_warning", "pillow_error"])
def test_decompression_bomb_over_pillows_limit(ours, side):
    # 100 MP trips Pillow's warning, 400 MP its error; both become our typed error, before decoding.
    assert side * side > Image.MAX_IMAGE_PIXELS
    assert_kind(ours, png_with_declared_size(side, side), "image_too_large")


def test_no_rgb_conversion_needs_rgb_input():
    processor = ImageProcessor.from_dict({**PREPROCESSOR, "do_convert_rgb": False})
    assert_kind(processor, encode(Image.new("L", (8, 8)), "PNG"), "image_format", "do_convert_rgb")
    assert processor.preprocess(encode(Image.new("RGB", (8, 8)), "PNG")).shape == (3, HEIGHT, WIDTH)


def test_non_bytes_input(ours):
    assert_kind(ours, "a path is not bytes", "image_decode", "must be bytes")


@pytest.mark.parametrize("fields", [{}, {"do_rescale": False}, {"do_normalize": False},
                                    {"image_mean": (0.48145466, 0.4578275, 0.40821073),
                                     "image_std": (0.26862954, 0.26130258, 0.27577711), "rescale_factor": 0.5 / 255}],
                         ids=["default", "no_rescale", "no_normalize", "clip_stats"])
def test_uint8_then_normalizer_equals_preprocess(fields):
    """What the pipeline ships (resize: uint8) and finishes on the device (normalizer) equals preprocess
    bit for bit, for every pixel value, on several images at once."""
    ours = ImageProcessor(ImageProcessorConfig(height=HEIGHT, width=WIDTH, **fields))
    images = [make() for _, make in CASES[:6]] + [encode(Image.fromarray(
        np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)), "PNG")]  # every value in every channel
    small = [ours.resize(data) for data in images]
    assert all(s.dtype == torch.uint8 and tuple(s.shape) == (3, HEIGHT, WIDTH) for s in small)
    got = ours.normalizer()(torch.stack(small))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), torch.stack([ours.preprocess(data) for data in images]).numpy())
