"""Region decoding of JPEGs (vit_hf.data._jpeg): the pixels of a full decode by Pillow, the same files refused, and
the same batches from the pipeline with either decoder."""

import io
import math

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vit_hf.data import photos as photos_module
from vit_hf.data.loader import make_loader

pytestmark = pytest.mark.skipif(
    photos_module._jpeg is None, reason="vit_hf._jpeg is not built (no C compiler or libjpeg-turbo headers at install)"
)


def photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth color gradients, edges and noise: the mix of low and high frequencies of a photo, in uint8 RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (f * x + g * y) + phase) for f, g, phase in rng.uniform(0.5, 4, (3, 3))]
    smooth = (np.stack(channels, axis=-1) + 1) * 100
    edges = ((x * 7).astype(int) + (y * 5).astype(int)) % 2 * 40
    return (smooth + edges[..., None] + rng.normal(0, 8, smooth.shape)).clip(0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def pillow_decode(jpeg: bytes, scale: int) -> np.ndarray:
    """Pillow's whole decode at 1/scale (its draft), as (H, W, 3) RGB."""
    image = Image.open(io.BytesIO(jpeg))
    width, height = image.size
    if scale > 1:  # PIL takes the most reduced scale that keeps the asked size
        image.draft(image.mode, (width // scale, height // scale))
        assert image.size == (math.ceil(width / scale), math.ceil(height / scale))
    return np.asarray(image.convert("RGB"))


def opened(jpeg: bytes) -> photos_module.OpenedImage:
    return photos_module.open_image({"bytes": jpeg, "path": None})


ENCODINGS = {
    "4:2:0": {},
    "4:2:2": {"subsampling": 1},
    "4:4:4": {"subsampling": 0},
    "progressive": {"progressive": True},
    "gray": {"mode": "L"},
    "restart markers": {"restart_marker_blocks": 3},
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_a_region_is_the_full_decode_bit_for_bit(encoding, scale):
    options = dict(ENCODINGS[encoding])
    jpeg = encode(photo_like(523, 397, seed=scale), options.pop("mode", "RGB"), **options)
    if encoding == "restart markers" and b"\xff\xd0" not in jpeg:
        pytest.skip("this Pillow writes no restart markers (restart_marker_blocks: Pillow >= 10.2)")
    full = pillow_decode(jpeg, scale)
    height, width = full.shape[:2]
    rng = np.random.default_rng(0)
    for _ in range(12):
        # Boxes anywhere, in fractional pixels of the reduced output, as the crop boxes are; and the whole image.
        left, top = rng.uniform(0, width - 2), rng.uniform(0, height - 2)
        right, bottom = rng.uniform(left + 1, width), rng.uniform(top + 1, height)
        for box in ((left, top, right, bottom), (0, 0, width, height)):
            pixels, (x0, y0, x1, y1) = photos_module._jpeg_region(opened(jpeg), box, scale)
            assert (x1 - x0, y1 - y0) == pytest.approx((box[2] - box[0], box[3] - box[1]))
            inside = pixels[math.floor(y0) : math.ceil(y1), math.floor(x0) : math.ceil(x1), :3]
            expected = full[math.floor(box[1]) : math.ceil(box[3]), math.floor(box[0]) : math.ceil(box[2])]
            np.testing.assert_array_equal(inside, expected)


def test_a_region_starts_at_a_block_column_at_or_left_of_the_box():
    jpeg = encode(photo_like(300, 200, seed=1))
    out = np.empty(200 * 300 * 4, dtype=np.uint8)
    for left, right in ((0, 300), (37, 38), (150, 299), (16, 17)):
        x0, width = photos_module._jpeg.decode_region(jpeg, out, 1, 50, 60, left, right)
        assert x0 <= left and x0 % 16 == 0 and x0 + width >= right and x0 + width <= 300


def truncations(jpeg: bytes) -> list[int]:
    """Lengths to cut the file to: inside the scan's data near its start, middle and end, and just the end marker."""
    scan = jpeg.index(b"\xff\xda")
    return [scan + 200, (scan + len(jpeg)) // 2, len(jpeg) - 40, len(jpeg) - 2]


@pytest.mark.parametrize("progressive", [False, True])
def test_a_truncated_jpeg_is_refused_as_pillow_refuses_it_wherever_the_region_lies(progressive):
    jpeg = encode(photo_like(400, 300, seed=2), progressive=progressive)
    for length in truncations(jpeg):
        cut = jpeg[:length]
        with pytest.raises(OSError, match="truncated"):
            Image.open(io.BytesIO(cut)).load()
        # A region at the top, above where the data ends: a full decode would have read on and failed.
        for box in ((0, 0, 60, 40), (100, 150, 300, 300)):
            with pytest.raises(OSError, match="image file is truncated"):
                photos_module._jpeg_region(opened(cut), box, 1)
    # Data after the end marker (some cameras append their own) is no truncation, for either.
    padded = jpeg + b"\x00" * 100
    Image.open(io.BytesIO(padded)).load()
    photos_module._jpeg_region(opened(padded), (0, 0, 60, 40), 1)


def test_corrupted_jpegs_are_decoded_or_refused_never_a_crash():
    # Random byte changes, insertions and cuts anywhere (markers, tables, scan data) and random regions and scales:
    # each call returns or raises OSError / ValueError; a crash would kill the worker, and bad_images "skip" with it.
    # (Far more such calls, also under valgrind, ran clean in the module and in libjpeg.)
    rng = np.random.default_rng(0)
    pixels = photo_like(203, 157, 0)
    jpegs = [encode(pixels, **{k: v for k, v in options.items() if k != "restart_marker_blocks"}) for options in
             ENCODINGS.values()]  # fmt: skip
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(3000):
        data = bytearray(jpegs[rng.integers(len(jpegs))])
        for _ in range(rng.integers(1, 6)):
            at = int(rng.integers(len(data)))
            change = rng.integers(3)
            if change == 0:
                data[at] = rng.integers(256)
            elif change == 1:
                data[at:at] = rng.integers(0, 256, rng.integers(1, 40)).astype(np.uint8).tobytes()
            elif at > 2:
                del data[at:]
        scale = int(rng.choice([1, 2, 4, 8]))
        width, height = -(-203 // scale), -(-157 // scale)
        top, left = int(rng.integers(height)), int(rng.integers(width))
        bottom, right = int(rng.integers(top + 1, height + 1)), int(rng.integers(left + 1, width + 1))
        out = bytearray((bottom - top) * 4 * 4096)  # room for any width a corrupted header may declare
        try:
            photos_module._jpeg.decode_region(bytes(data), out, scale, top, bottom, left, right)
            outcomes["decoded"] += 1
        except (OSError, ValueError):
            outcomes["refused"] += 1
    assert min(outcomes.values()) > 100  # both outcomes met: the corruptions reached the decoder


def test_a_cmyk_jpeg_is_left_to_pillow():
    cmyk = encode(photo_like(64, 48, seed=3), "CMYK")
    out = np.empty(48 * 64 * 4, dtype=np.uint8)
    with pytest.raises(ValueError, match="not a gray, YCbCr or RGB JPEG"):
        photos_module._jpeg.decode_region(cmyk, out, 1, 0, 48, 0, 64)
    assert opened(cmyk).image.mode == "CMYK"  # so photos.decoded_box takes Pillow's path for it


def jpeg_rows(jpegs: list[bytes]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": j, "path": None} for j in jpegs], "label": [0] * len(jpegs)}, features=features
    )


def batches(dataset: datasets.Dataset, **options) -> list[dict]:
    loader = make_loader(dataset, "image", "label", 8, shuffle=False, bad_images="skip", **options)
    return list(loader)


def test_the_pipeline_makes_the_same_batches_with_either_decoder(monkeypatch):
    # Mixed sizes (drafted at 1/2 to 1/8 for some boxes), gray, progressive, 4:4:4, a truncated file, and EXIF
    # orientations: every prepared batch, train and eval, equals the one of Pillow's whole decodes, bit for bit.
    rng = np.random.default_rng(4)
    jpegs = []
    for i in range(24):
        width, height = (int(side) for side in rng.integers(90, 900, 2))
        options = [{}, {"mode": "L"}, {"progressive": True}, {"subsampling": 0}][i % 4]
        image = Image.fromarray(photo_like(width, height, seed=i)).convert(options.pop("mode", "RGB"))
        exif = Image.Exif()
        exif[0x0112] = [1, 3, 6, 8][i % 4]
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90, exif=exif, **options)
        jpegs.append(buffer.getvalue())
    jpegs[5] = jpegs[5][: len(jpegs[5]) // 2]
    dataset = jpeg_rows(jpegs)
    settings = [
        {"image_size": 64, "crop_scale": (0.05, 1.0), "hflip": True},
        {"image_size": 32, "crop_scale": (0.05, 1.0), "hflip": True},
        {"image_size": 48},
    ]
    for options in settings:
        region = batches(dataset, **options)
        monkeypatch.setattr(photos_module, "_jpeg", None)
        whole = batches(dataset, **options)
        monkeypatch.undo()
        assert sum(int(b["skipped"]) for b in region) == sum(int(b["skipped"]) for b in whole) == 1
        for ours, theirs in zip(region, whole, strict=True):
            assert ours["prepared"] and torch.equal(ours["index"], theirs["index"])
            assert torch.equal(ours["pixels"], theirs["pixels"])
