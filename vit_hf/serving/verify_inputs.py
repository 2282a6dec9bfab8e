"""What an export is verified on: rows of a data set split (with labels), image files, or seeded sample images.

Each source is an `Inputs`: a description for the report, and a function that yields batches of float32 pixel values
(B, 3, S, S) with their labels (None where there are none), as often as asked.
"""

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vit_hf.data.loader import make_loader
from vit_hf.data.sources import load_splits
from vit_hf.data.transforms import DeviceTransform
from vit_hf.recipe import SPLIT_FIELDS
from vit_hf.serving.preprocess import Preprocessing
from vit_hf.utils.errors import UserError
from vit_hf.utils.files import public_name

Batch = tuple[np.ndarray, np.ndarray | None]


@dataclasses.dataclass
class Inputs:
    """Batches of model inputs and labels, and what they are ("rows of cifar10 test[:200]", ...)."""

    description: str
    count: int
    batches: Callable[[], Iterator[Batch]]
    labelled: bool
    class_names: list[str] | None = None


def recipe_split(recipe: dict, split: str | None) -> str:
    """The split expression SPLIT names: train, eval or test for the recipe's own, any other as given; the recipe's
    eval split by default."""
    field = SPLIT_FIELDS.get(split or "eval")
    expression = recipe["data"][field] if field else split
    if expression is None:
        raise UserError(f"--split {split or 'eval'}: the recipe's data.{field} is null")
    return expression


def split_inputs(data: dict, split: str, image_size: int, batch_size: int, limit: int | None = None) -> Inputs:
    """The rows of SPLIT of DATA's data set (a recipe's `data` section), the first LIMIT of them where given,
    preprocessed as evaluation preprocesses them (`DeviceTransform`, eval)."""
    data = {**data, "train_split": None, "eval_split": None, "test_split": split}
    try:
        splits = load_splits(data)
    except UserError as error:
        raise UserError(str(error).replace("test_split", "split", 1)) from None
    rows = splits.test if limit is None else splits.test.select(range(min(limit, len(splits.test))))
    transform = DeviceTransform(image_size, train=False)
    options = {"image_size": image_size, "bad_images": data.get("bad_images", "stop")}

    def batches() -> Iterator[Batch]:
        loader = make_loader(rows, splits.image_column, splits.label_column, batch_size, shuffle=False, **options)
        for batch in loader:
            yield transform(batch["pixels"]).numpy(), batch["labels"].numpy()

    what = f"{len(rows)} rows of {public_name(splits.name)} {split}"  # it goes into the folder's card
    return Inputs(what, len(rows), batches, True, splits.class_names)


def file_inputs(paths: Sequence[Path], preprocessing: Preprocessing, batch_size: int) -> Inputs:
    """Image files, preprocessed as serving preprocesses them."""

    def batches() -> Iterator[Batch]:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            yield preprocessing.pixel_values([preprocessing.read(path) for path in chunk]), None

    return Inputs(f"{len(paths)} image files", len(paths), batches, False)


def sample_inputs(preprocessing: Preprocessing, count: int = 64, seed: int = 0) -> Inputs:
    """COUNT seeded sample images, smooth colour fields with noise: stand-ins for photos where no data is given."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        colours = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        smooth = np.asarray(colours.resize((preprocessing.width, preprocessing.height), Image.Resampling.BILINEAR))
        noise = rng.normal(0, 8, smooth.shape)
        images.append(np.clip(smooth + noise, 0, 255).astype(np.uint8))
    pixel_values = preprocessing.pixel_values(images)

    def batches() -> Iterator[Batch]:
        yield pixel_values, None

    return Inputs(f"{count} sample images (seeded colour fields, not real data)", count, batches, False)
