"""A batch out of the loader's workers: the collate that decodes rows into uint8 pixels, on the device path or
prepared (cropped and resized from the original photo), and the batch that carries an error out of a worker."""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from vit_hf.data.messages import one_line
from vit_hf.data.photos import (
    OpenedImage,
    decoded_box,
    open_image,
    oriented,
    resize_box,
    size_text,
    stored_box,
    upright_pixels,
)
from vit_hf.data.transforms import crop_boxes
from vit_hf.utils.errors import RunError, UserError


class FailedBatch(dict):
    """The batch the collate returns when it cannot make one: reading any key raises its UserError there.

    An exception raised in a worker reaches the main process only as torch's text of its traceback; a batch arrives
    intact, through pinning and accelerate's move to the device (both copy it with `items()`), with workers or not.
    """

    def __getitem__(self, key: str):
        error = UserError if dict.get(self, "exit_code", 2) == 2 else RunError  # 1: the data could not be read
        raise error(dict.get(self, "error"))


_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class Collate:
    """The DataLoader's collate_fn: decode a batch of rows into uint8 pixels, in the workers. Two paths:

    - device: a batch of images of one size, none larger than image_size (CIFAR: 32 px), leaves as it is decoded,
      a few hundred kB; the crop, resize and flip run afterwards as batched ops on the device (`DeviceTransform`),
      where they cost little.
    - prepared: any other batch (larger images, which would be large to send and resample, or mixed sizes, which
      cannot be stacked) is brought to image_size here, image by image (`_prepare`): cut the crop out of the
      original image, resize it and flip, as the official pipeline does. It leaves marked "prepared", so that the
      device only scales it.
    """

    image_column: str
    bad_images: str
    image_size: int | None
    crop_scale: Sequence[float] | None
    hflip: bool
    seed: int
    split: str | None = None  # the split's expression, for the errors
    shard_rows: int | None = None  # a stream's row indices are shard * shard_rows + row in the shard

    def __call__(self, rows: list[tuple[int, int, int, dict]]) -> dict:
        try:
            return self._batch(rows)
        except UserError as error:
            return FailedBatch(error=str(error))

    def _batch(self, rows: list[tuple[int, int, int, dict]]) -> dict:
        # (row, epoch, label, the file's path or None, the opened image); the path names a broken file.
        opened = [
            (row, epoch, label, path, self._read(row, path, functools.partial(open_image, image)))
            for row, epoch, label, image in rows
            for path in [_path(image)]
        ]
        opened = [entry for entry in opened if entry[4] is not None]
        sizes = {image.size for *_, image in opened}  # as the image is seen: EXIF orientation applied
        if len(sizes) > 1 and self.image_size is None:
            first_row, *_, first = opened[0]
            odd_row, *_, odd = next(entry for entry in opened if entry[4].size != first.size)
            raise UserError(
                f"images of different sizes in one batch: row {first_row} is {size_text(first)}, row {odd_row} is "
                f"{size_text(odd)} (width x height); set image_size to resize them"
            )
        size = self.image_size
        prepared = size is not None and (len(sizes) > 1 or any(max(w, h) > size for w, h in sizes))
        if prepared:
            arrays = self._prepare(opened)
        else:
            arrays = [
                self._read(row, path, functools.partial(upright_pixels, image)) for row, _, _, path, image in opened
            ]
        kept = [
            (row, label, array) for (row, _, label, *_), array in zip(opened, arrays, strict=True) if array is not None
        ]
        read = {row for row, _, _ in kept}
        height, width = kept[0][2].shape[:2] if kept else (size or 0, size or 0)
        pixels = np.empty((len(kept), 3, height, width), dtype=np.uint8)
        for i, (*_, array) in enumerate(kept):
            # The one copy of each image's pixels: the arrays are views, oriented and flipped by their strides.
            pixels[i] = array.transpose(2, 0, 1)
        return {
            "pixels": torch.from_numpy(pixels),
            "labels": torch.tensor([label for _, label, _ in kept], dtype=torch.int64),
            "index": torch.tensor([row for row, _, _ in kept], dtype=torch.int64),
            "skipped": torch.tensor(len(rows) - len(kept), dtype=torch.int64),
            # The rows skipped, so that a run counts each broken image once however many epochs read it.
            "skipped_rows": torch.tensor([row for row, *_ in rows if row not in read], dtype=torch.int64),
            "prepared": prepared,
        }

    def _read(self, row: int, path: str | None, read: Callable[[], _T]) -> _T | None:
        """read(), or None for an undecodable image if bad_images is "skip" (else a UserError naming the file where
        the row has a path, the split and the row)."""
        try:
            return read()
        except Exception as error:  # PIL raises many kinds of error on a broken file
            if self.bad_images == "skip":
                return None
            where = f"{path} ({self._place(row)})" if path else f"in {self._place(row)}"
            raise UserError(
                f"undecodable image {where}, column {self.image_column!r}: {one_line(error)} "
                '(bad_images: "skip" drops such rows)'
            ) from error

    def _place(self, row: int) -> str:
        """Where a row is: "split 'train[:98%]', row 7" (a stream's: "..., shard 2, row 7")."""
        parts = [] if self.split is None else [f"split {self.split!r}"]
        if self.shard_rows:
            parts.append(f"shard {row // self.shard_rows}")
            row %= self.shard_rows
        return ", ".join([*parts, f"row {row}"])

    def _prepare(self, opened: list[tuple[int, int, int, str | None, OpenedImage]]) -> list[np.ndarray | None]:
        """Each image as an (S, S, 3) uint8 view (None: undecodable, skipped): a crop box of the original image
        resized to S = image_size, and flipped at random.

        The boxes and the flips follow DeviceTransform: `random_crop_boxes` on each image's own size as it is seen,
        EXIF orientation applied (the whole image when crop_scale is None, i.e. for eval), then a coin if hflip; each
        row draws them from its own generator, a function of (seed, epoch, row) only, so a resumed run, any worker
        count and any process count see the same crops. The box is cut out and resized with PIL's bilinear filter
        (`resize_box`, as `DeviceTransform` does on the device); of a JPEG only the box's region is decoded
        (`decoded_box`), at reduced scale where the box allows.
        """
        # One draw per row, in DeviceTransform's order: the crop's 10 attempts (20), its offsets (2), then the flip.
        # Torch's CPU generator fills a tensor serially, so these are the numbers of three successive calls.
        draws = torch.stack([torch.rand(23, generator=_row_generator(self.seed, e, r)) for r, e, *_ in opened])
        attempts, offsets, flips = draws[:, :20].view(-1, 10, 2), draws[:, 20:22], draws[:, 22] < 0.5
        widths, heights = torch.tensor([image.size for *_, image in opened], dtype=torch.float32).unbind(dim=1)
        if self.crop_scale is None:
            boxes = torch.stack([torch.zeros_like(heights), torch.zeros_like(widths), heights, widths], dim=1)
        else:
            boxes = crop_boxes(attempts, offsets, heights, widths, self.crop_scale)
        return [
            self._crop(row, path, image, box.tolist(), self.hflip and bool(flip))
            for (row, _, _, path, image), box, flip in zip(opened, boxes, flips, strict=True)
        ]

    def _crop(self, row: int, path: str | None, opened: OpenedImage, box: list[float], flip: bool) -> np.ndarray | None:
        """The box (top, left, height, width) of the image as seen, resized to image_size and flipped if `flip`.

        The box is cut from the stored pixels where it lies there, and the small result oriented afterwards, so that
        no full-size image is transposed: for EXIF flips (orientations 2-4) this equals `exif_transpose` first; for
        the orientations that swap the axes (5-8) the two resize passes run in the other order, and the uint8
        rounding between them differs by one level at most, in a small share of the values, a larger one on smooth
        gradients (tests/data/test_photos.py).
        """
        swap, flip_rows, flip_columns = opened.orientation
        top, left, box_height, box_width = stored_box(box, opened.orientation, opened.size)
        region = (left, top, left + box_width, top + box_height)
        decoded = self._read(row, path, functools.partial(decoded_box, opened, region, self.image_size))
        if decoded is None:
            return None
        resized = resize_box(*decoded, self.image_size)
        # The result is a copy: free the decoded photo now, not with the batch, so a worker's memory does not grow
        # with the batch size.
        opened.image.close()
        return oriented(resized, (swap, flip_rows, flip_columns != flip))


def _path(image: dict | None) -> str | None:
    """The file a row's image was read from (an image folder's file, a webdataset member), if the row names one."""
    return image.get("path") if isinstance(image, dict) else None


def _row_generator(seed: int, epoch: int, row: int) -> torch.Generator:
    """The random source of one row's crop and flip in one epoch."""
    # SeedSequence spreads the three numbers over the whole state (it takes non-negative entropy only).
    state = np.random.SeedSequence([seed % 2**64, epoch, row]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))
