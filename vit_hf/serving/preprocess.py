"""The saved image processor's preprocessing, done fast: each image resized in a worker thread exactly as
`ViTImageProcessorPil` resizes it (PIL, the same filter), then the rescaling and normalisation of a whole batch at once.

Torch-free, so that an ONNX folder is served without importing torch.
"""

import dataclasses
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from vit_hf.data.images import load_image
from vit_hf.data.messages import one_line
from vit_hf.utils.errors import UserError

PROCESSOR_FILE = "preprocessor_config.json"
# Batches read ahead while the model runs on the current one.
BATCHES_AHEAD = 2


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Resize to (height, width) with PIL filter `resample`, then `pixels * scale + shift` per channel: the
    processor's rescale ((x * rescale_factor - mean) / std) folded into one multiply-add."""

    height: int
    width: int
    resample: int
    scale: np.ndarray
    shift: np.ndarray

    @classmethod
    def from_folder(cls, model_dir: str | os.PathLike) -> "Preprocessing":
        """MODEL_DIR's preprocessor_config.json; a one-line UserError naming a field it cannot follow."""
        path = Path(model_dir) / PROCESSOR_FILE
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{path}: cannot be read ({one_line(error)})") from None
        for field, unsupported in (("do_resize", False), ("do_center_crop", True), ("do_pad", True)):
            if config.get(field) == unsupported:
                raise UserError(f"{path}: {field} {unsupported} is not supported (a plain resize is)")
        size = config.get("size") or {}
        if not isinstance(size, dict) or not {"height", "width"} <= size.keys():
            raise UserError(f"{path}: size {size!r} is not supported (a fixed height and width are)")
        rescale = config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0
        normalize = config.get("do_normalize", True)
        mean, std = (config.get("image_mean", 0.5), config.get("image_std", 0.5)) if normalize else (0.0, 1.0)
        mean, std = (np.broadcast_to(np.asarray(v, dtype=np.float64), (3,)) for v in (mean, std))
        scale, shift = rescale / std, -mean / std
        return cls(
            int(size["height"]),
            int(size["width"]),
            int(config.get("resample", Image.Resampling.BILINEAR)),
            scale.astype(np.float32).reshape(1, 3, 1, 1),
            shift.astype(np.float32).reshape(1, 3, 1, 1),
        )

    def resize(self, image: Image.Image) -> np.ndarray:
        """An RGB image as (height, width, 3) uint8, resized as the image processor resizes it."""
        if image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), resample=self.resample)
        return np.asarray(image)

    def read(self, path: str | os.PathLike) -> np.ndarray:
        """The image file at PATH, upright, RGB and resized; a UserError naming the file when it cannot be decoded."""
        return self.resize(load_image(path))

    def pixel_values(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Resized uint8 images (B, H, W, 3) to the model's float32 input (B, 3, H, W)."""
        batch = np.stack(images) if not isinstance(images, np.ndarray) else images
        pixels = batch.transpose(0, 3, 1, 2).astype(np.float32)
        return np.ascontiguousarray(pixels * self.scale + self.shift)


def _attempt(read: Callable[[Path], np.ndarray], path: Path) -> np.ndarray | UserError:
    try:
        return read(path)
    except UserError as error:
        return error


def read_batches(
    paths: Sequence[Path], read: Callable[[Path], np.ndarray], batch_size: int, workers: int | None = None
) -> Iterator[list[tuple[Path, np.ndarray | UserError]]]:
    """(path, image or the UserError of a file that cannot be read) per path, a batch at a time, in order.

    Worker threads read and resize the next batches while the caller runs the model on this one (Pillow releases
    the GIL while it decodes and resizes).
    """
    chunks = (paths[start : start + batch_size] for start in range(0, len(paths), batch_size))
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read") as pool:
        pending: deque[tuple[Sequence[Path], list[Future]]] = deque()

        def submit_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append((chunk, [pool.submit(_attempt, read, path) for path in chunk]))

        for _ in range(BATCHES_AHEAD + 1):
            submit_next()
        while pending:
            chunk, futures = pending.popleft()
            submit_next()
            yield [(path, future.result()) for path, future in zip(chunk, futures, strict=True)]
