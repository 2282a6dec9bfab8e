"""Image files named on a command line: the files of folders, and each file read upright in RGB."""

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from vit_hf.utils.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by INPUTS: files as given, folders walked for image files in sorted order."""
    paths = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"{path}: no image files in this folder")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return paths


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at PATH in RGB, upright by its EXIF orientation as transformers' `load_image` (the pipeline's input)
    and datasets' Image decode (training) make it; a UserError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            ImageOps.exif_transpose(image, in_place=True)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        raise UserError(f"{path}: not a readable image file") from None
    except Image.DecompressionBombError as error:  # not an OSError: Pillow's guard against a huge declared size
        raise UserError(f"{path}: {error}") from None
