"""Photos in the loader's workers: opened with their EXIF orientation, decoded (of a JPEG only the region a crop box
lies in, at reduced scale where the box allows), cut and resized to the model's size.

The JPEG region decode is the C extension `vit_hf.data._jpeg` (libjpeg-turbo), built where the install found a C
compiler and libjpeg-turbo's headers; without it, or with VIT_HF_JPEG_DECODER=pillow, Pillow decodes whole JPEGs
instead: the same crops, slower.
"""

import dataclasses
import io
import math
import os
import warnings

import numpy as np
import PIL.Image
import pyarrow as pa
import torch

try:
    from vit_hf.data import (
        _jpeg,  # compiled where the install found a C compiler and libjpeg-turbo's headers (setup.py)
    )
except ImportError:
    _jpeg = None  # whole JPEGs decoded by Pillow instead: the same crops, slower
# VIT_HF_JPEG_DECODER=pillow: Pillow's whole decode even where the extension is built (a comparison, a way around it).
JPEG_DECODER_VARIABLE = "VIT_HF_JPEG_DECODER"
if os.environ.get(JPEG_DECODER_VARIABLE) == "pillow":
    _jpeg = None

# The orientation each EXIF Orientation value asks for (PIL.ImageOps.exif_transpose's table), as what is done to the
# stored pixels, in this order: swap the axes, flip the rows (upside down), flip the columns (mirror). 1 and any other
# value: as stored.
_ORIENTATIONS = {
    2: (False, False, True),  # FLIP_LEFT_RIGHT
    3: (False, True, True),  # ROTATE_180
    4: (False, True, False),  # FLIP_TOP_BOTTOM
    5: (True, False, False),  # TRANSPOSE
    6: (True, False, True),  # ROTATE_270 (90 degrees clockwise)
    7: (True, True, True),  # TRANSVERSE
    8: (True, True, False),  # ROTATE_90 (90 degrees counter-clockwise)
}
_AS_STORED = (False, False, False)


@dataclasses.dataclass(frozen=True)
class OpenedImage:
    """An opened image (size and format known, pixels not decoded yet for JPEG), its EXIF orientation, and the file's
    bytes where the row holds them (None: the image was opened from its path)."""

    image: PIL.Image.Image
    orientation: tuple[bool, bool, bool]
    data: bytes | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as the image is seen, oriented."""
        width, height = self.image.size
        return (height, width) if self.orientation[0] else (width, height)

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]


def open_image(image: dict) -> OpenedImage:
    """The stored image, opened, with the orientation datasets' Image decode and transformers' `load_image` apply:
    the EXIF (or XMP) Orientation tag, read as `PIL.ImageOps.exif_transpose` reads it."""
    if image is None or image.get("bytes") is None and not image.get("path"):
        raise ValueError("the row has no image (null)")
    opened = PIL.Image.open(io.BytesIO(image["bytes"]) if image["bytes"] is not None else image["path"])
    if opened.format == "PNG" and not _png_metadata_after_pixels(opened):
        # PNG's getexif decodes the pixels first, as EXIF or XMP may follow them: where no such chunk does, read what
        # it would read without decoding, so that a batch's PNGs are not all decoded at once before the first crop.
        exif = PIL.Image.Image.getexif(opened)
    else:
        exif = opened.getexif()  # a JPEG's EXIF is in its header
    orientation = exif.get(PIL.Image.ExifTags.Base.Orientation)
    return OpenedImage(opened, _ORIENTATIONS.get(orientation, _AS_STORED), image["bytes"])


# The PNG chunks that Pillow reads EXIF or XMP (an Orientation) from.
_PNG_METADATA_CHUNKS = {b"eXIf", b"tEXt", b"zTXt", b"iTXt"}


def _png_metadata_after_pixels(opened: PIL.Image.Image) -> bool:
    """Whether an opened PNG has an EXIF or text chunk after its first IDAT, where the open did not read it: the
    chunk headers from there on are read and their data skipped, not decoded."""
    if len(opened.tile) != 1 or opened.fp is None:
        return True  # not the layout of a plain PNG: let getexif decode it
    # The tile's offset (its 3rd field; Pillow < 11 has plain tuples) is the first IDAT's data, 8 bytes past its header.
    fp, position = opened.fp, opened.tile[0][2] - 8
    while True:
        fp.seek(position)
        header = fp.read(8)
        if len(header) < 8 or header[4:] == b"IEND":
            return False
        if header[4:] in _PNG_METADATA_CHUNKS:
            return True
        position += 12 + int.from_bytes(header[:4], "big")  # length, type, data, CRC


def upright_pixels(opened: OpenedImage) -> np.ndarray:
    """The whole image, oriented, as an (H, W, 3) uint8 view."""
    return oriented(np.asarray(_to_rgb(opened.image)), opened.orientation)


def stored_box(box: list[float], orientation: tuple[bool, bool, bool], size: tuple[int, int]) -> list[float]:
    """A box (top, left, height, width) of the image as seen (of `size`, width x height) in the stored pixels."""
    swap, flip_rows, flip_columns = orientation
    top, left, height, width = box
    if flip_rows:
        top = size[1] - top - height
    if flip_columns:
        left = size[0] - left - width
    return [left, top, width, height] if swap else [top, left, height, width]


def oriented(pixels: np.ndarray, orientation: tuple[bool, bool, bool]) -> np.ndarray:
    """(H, W, C) stored pixels as seen: a view (swap the axes, then flip the rows, then the columns)."""
    swap, flip_rows, flip_columns = orientation
    if swap:
        pixels = pixels.transpose(1, 0, 2)
    if flip_rows:
        pixels = pixels[::-1]
    return pixels[:, ::-1] if flip_columns else pixels


def resize_box(pixels: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The box (left, top, right, bottom) of decoded (H, W, 3 or 4) uint8 pixels (RGB, or RGB and an unused byte),
    cut out and resized to size x size with PIL's bilinear filter (a triangle widened to the scale when
    downsampling), as an (S, S, 3) uint8 view.

    Cut, then resized, as the official input pipeline (a slice of the decoded image, then the resize), torchvision's
    RandomResizedCrop and the transformers example do: the filter's taps stop at the box. A box in whole pixels (any
    box of an image decoded at full size) is resized by torch's uint8 antialiased bilinear `interpolate`, PIL's
    filter in fixed point (SIMD kernels), quicker than PIL, within 1 level of PIL's crop + resize in a small share
    of the values (it rounds the pass between the two axes on its own). A box in fractional pixels (a JPEG decoded
    at reduced scale, `_draft_scale`) is cut to the whole pixels around it and resized by PIL, which resamples from
    fractional coordinates.
    """
    if not all(float(edge).is_integer() for edge in box):
        left, top, right, bottom = box
        x0, y0 = math.floor(left), math.floor(top)
        around = PIL.Image.fromarray(np.ascontiguousarray(pixels[y0 : math.ceil(bottom), x0 : math.ceil(right), :3]))
        inside = (left - x0, top - y0, right - x0, bottom - y0)
        return _array(around.resize((size, size), PIL.Image.BILINEAR, box=inside))
    left, top, right, bottom = (int(edge) for edge in box)
    with warnings.catch_warnings():  # PIL's pixels are read-only; interpolate only reads them
        warnings.simplefilter("ignore", UserWarning)
        crop = torch.from_numpy(pixels[top:bottom, left:right]).permute(2, 0, 1).unsqueeze(0)
    # Copied to rows of its own first: the kernel resizes a box with rows of the box's width faster than one inside the
    # photo's wider rows, with the same result, even counting the copy.
    crop = crop.contiguous(memory_format=torch.channels_last)
    resized = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
    return resized[0, :3].permute(1, 2, 0).numpy()  # channels last, as the input: a view


def _array(image: PIL.Image.Image) -> np.ndarray:
    """An RGB image's pixels as an (H, W, 3) uint8 array: a view of PIL's own storage where PIL exports it through
    Arrow (Pillow >= 11.2, single-block images), else a copy.

    `np.asarray` copies through PIL's raw encoder; the view leaves one copy, into the batch.
    """
    return _pixel_rows(image)[..., :3]


def _pixel_rows(image: PIL.Image.Image) -> np.ndarray:
    """An RGB image as PIL stores it, (H, W, 4) with the 4th byte unused, where Arrow exports it as a view, else an
    (H, W, 3) copy. The 4-byte pixels are the layout torch's fastest uint8 resize reads as it is."""
    if not hasattr(image, "__arrow_c_array__"):
        return np.asarray(image)
    try:
        pixels = pa.array(image)
    except ValueError:  # rows in several blocks (large images)
        return np.asarray(image)
    return pixels.values.to_numpy(zero_copy_only=True).reshape(image.height, image.width, 4)


def decoded_box(
    opened: OpenedImage, box: tuple[float, float, float, float], size: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Decoded pixels around a box (left, top, right, bottom) of the stored image, and the box within them: for a
    gray or color JPEG, only the region the box lies in, at the `_draft_scale` the box allows (`_jpeg_region`);
    otherwise the whole image, by Pillow (a JPEG drafted at that scale)."""
    scale = _draft_scale(box[2] - box[0], box[3] - box[1], size)
    if _jpeg is not None and opened.image.format in ("JPEG", "MPO") and opened.image.mode in ("L", "RGB"):
        return _jpeg_region(opened, tuple(edge / scale for edge in box), scale)
    scale = _draft(opened.image, scale)
    return _pixel_rows(_to_rgb(opened.image)), tuple(edge / scale for edge in box)


def _jpeg_region(
    opened: OpenedImage, box: tuple[float, float, float, float], scale: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The rows and columns of a JPEG decoded at 1/scale that the box (in that output's pixels) lies in, as (H, W, 4)
    RGBX pixels, and the box within them.

    libjpeg-turbo skips the rows above, keeps to the box's columns and stops below (vit_hf/data/_jpeg.c): the
    region's pixels equal a full decode's, bit for bit, with one column more on each side, where a region's edge
    would lack the neighbour that the upsampling of subsampled chroma reads.
    """
    if opened.data is not None:
        data = opened.data
    else:
        opened.image.fp.seek(0)
        data = opened.image.fp.read()
    width, height = (-(-side // scale) for side in opened.image.size)  # libjpeg's output size: rounded up
    left, top, right, bottom = box
    rows = (math.floor(top), min(height, math.ceil(bottom)))
    columns = (max(0, math.floor(left) - 1), min(width, math.ceil(right) + 1))
    out = np.empty((rows[1] - rows[0]) * width * 4, dtype=np.uint8)
    x0, region_width = _jpeg.decode_region(data, out, scale, *rows, *columns)
    pixels = out[: (rows[1] - rows[0]) * region_width * 4].reshape(rows[1] - rows[0], region_width, 4)
    return pixels, (left - x0, top - rows[0], right - x0, bottom - rows[0])


def _draft_scale(box_width: float, box_height: float, size: int) -> int:
    """The most reduced of 1/8, 1/4 and 1/2 scale at which the box still spans `size` pixels both ways (1: none).

    libjpeg scales while it decodes (its DCT at reduced size), at a fraction of the cost of a full decode. The result
    stays within a fraction of a uint8 level on average of a full decode with the same box and resize; small outputs
    differ more (tests/data/test_data.py bounds both).
    """
    return next((s for s in (8, 4, 2) if box_width >= s * size and box_height >= s * size), 1)


def _draft(image: PIL.Image.Image, scale: int) -> int:
    """Have Pillow decode a JPEG at 1/scale; return the scale it will decode at (1 for other formats, which have no
    such decoder)."""
    if scale == 1:
        return 1
    width, height = image.size
    # PIL takes the largest scale that keeps the image at least the asked size: `scale`, as the box fits in it.
    drafted = image.draft(image.mode, (width // scale, height // scale))
    return round(width / drafted[1][2]) if drafted else 1


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """The decoded image in 8-bit RGB: gray replicated, palette looked up, alpha dropped, 16 bit scaled."""
    if image.mode == "RGB":
        image.load()
        return image  # as decoded: a conversion would copy it
    if image.mode.startswith("I"):
        # PIL's own conversion of 16- or 32-bit integer gray clips at 255; scale [0, 65535] to [0, 255] instead.
        gray = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = PIL.Image.fromarray(((gray + 128) // 257).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the direct conversion to RGB warns about palette transparency
    return image.convert("RGB")


def size_text(image: OpenedImage | PIL.Image.Image) -> str:
    """An image's width x height, for messages."""
    return f"{image.width}x{image.height}"
