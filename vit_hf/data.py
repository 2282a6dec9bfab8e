"""Input pipeline: data sets and splits, uint8 batches from CPU workers, and the ViT preprocessing on the device.

The CPU workers only decode: a CIFAR batch leaves them as 32 px uint8 (a few hundred kB). The crop, the resize to
the model's size, the flip and the normalisation run afterwards as batched tensor ops on the training device
(`DeviceTransform`), where they cost little, instead of per image in PIL on a few CPU cores.
"""

import dataclasses
import functools
import io
import math
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from vit_hf.errors import UserError

DATA_DEFAULTS = {
    "dataset": "cifar10",
    "train_split": "train[:98%]",
    # The official code selects models on a minival split carved from train; the test split is only reported.
    "eval_split": "train[98%:]",
    "test_split": "test",
    "image_column": None,
    "label_column": None,
}
HUB_NAMES = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
SPLIT_FIELDS = {"train": "train_split", "eval": "eval_split", "test": "test_split"}
LOCAL_FILES_HINT = (
    'point the recipe\'s data.dataset at local files, e.g. {"path": "parquet", "data_files": {"train": ..., '
    '"test": ...}} or {"cifar_archive": "path/to/cifar-10-python.tar.gz"}'
)

# The original CIFAR python archives: the pickles of each split, and for each label column of the Hub's schema the
# key of its labels in a batch and of its class names in the meta pickle.
CIFAR_LAYOUTS = {
    "batches.meta": {
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": {"label": (b"labels", b"label_names")},
    },
    "meta": {
        "train": ["train"],
        "test": ["test"],
        "labels": {
            "fine_label": (b"fine_labels", b"fine_label_names"),
            "coarse_label": (b"coarse_labels", b"coarse_label_names"),
        },
    },
}


@dataclasses.dataclass
class DataSplits:
    """The train, minival and test splits of one data set (None where skipped), and how to read them."""

    train: datasets.Dataset | None
    eval: datasets.Dataset | None
    test: datasets.Dataset | None
    image_column: str
    label_column: str
    class_names: list[str]
    name: str


def load_splits(data: dict) -> DataSplits:
    """Load the data set of a recipe's `data` section and cut its train, minival and test splits."""
    data = {**DATA_DEFAULTS, **data}
    source, name = _load_source(data["dataset"])
    image_column, label_column, class_names = _find_columns(source, data["image_column"], data["label_column"], name)
    splits = {}
    for split, field in SPLIT_FIELDS.items():
        expression = data[field]
        if expression is None:
            splits[split] = None
            continue
        dataset = _select_split(source, expression, name, field)
        _check_labels(dataset, label_column, len(class_names), f"{name}, {field} {expression!r}")
        splits[split] = dataset
    return DataSplits(
        **splits, image_column=image_column, label_column=label_column, class_names=class_names, name=name
    )


def _load_source(dataset: str | dict) -> tuple[datasets.DatasetDict, str]:
    """All splits of the data set a recipe names, and a readable name of it."""
    if isinstance(dataset, str):
        if dataset not in HUB_NAMES:
            raise UserError(
                f"unknown data set name {dataset!r}: use one of {', '.join(HUB_NAMES)}, "
                'or the keyword arguments of datasets.load_dataset, e.g. {"path": "imagefolder", "data_dir": ...}'
            )
        dataset = {"path": HUB_NAMES[dataset]}
    if "cifar_archive" in dataset:
        return _read_cifar_archive(Path(dataset["cifar_archive"])), Path(dataset["cifar_archive"]).name
    name = _source_name(dataset)
    try:
        source = datasets.load_dataset(**dataset)
    except ConnectionError as error:
        raise UserError(f"could not fetch data set {name!r} ({_one_line(error)}); {LOCAL_FILES_HINT}") from error
    except FileNotFoundError as error:
        raise UserError(f"data set {name!r}: {_one_line(error)}") from error
    if not isinstance(source, datasets.DatasetDict):
        raise UserError(
            f"data set {name!r}: load_dataset must return all splits (no 'split' or 'streaming' keys); "
            "choose splits with train_split, eval_split and test_split"
        )
    return source, name


def _source_name(kwargs: dict) -> str:
    """The Hub id, or for local files (parquet, imagefolder, ...) the name of the folder that holds them."""
    path = kwargs.get("path", "")
    files = kwargs.get("data_files")
    while isinstance(files, dict | list | tuple) and files:  # {"train": [...], ...}: its first file
        files = next(iter(files.values())) if isinstance(files, dict) else files[0]
    if "/" in path or not (kwargs.get("data_dir") or files):
        return path
    if kwargs.get("data_dir"):
        return Path(kwargs["data_dir"]).resolve().name
    return Path(files).resolve().parent.name


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _read_cifar_archive(path: Path) -> datasets.DatasetDict:
    """The train and test splits of an original CIFAR-10/100 python archive, in the schema of the Hub's copies."""
    if not path.is_file():
        raise UserError(f"CIFAR archive {str(path)!r} not found")
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {Path(member.name).name: member for member in archive.getmembers() if member.isfile()}
            meta_name = next((name for name in CIFAR_LAYOUTS if name in members), None)
            if meta_name is None:
                raise UserError(f"{path.name} is not a CIFAR python archive: it has no batches.meta or meta file")
            layout = CIFAR_LAYOUTS[meta_name]
            missing = [name for name in layout["train"] + layout["test"] if name not in members]
            if missing:
                raise UserError(f"CIFAR archive {path.name} lacks {', '.join(missing)}")

            def unpickle(name: str) -> dict:
                # The official archives are pickles with bytes keys: only read archives from a trusted source.
                return pickle.load(archive.extractfile(members[name]), encoding="bytes")

            meta = unpickle(meta_name)
            batches = {split: [unpickle(name) for name in layout[split]] for split in ("train", "test")}
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise UserError(f"cannot read CIFAR archive {path.name}: {_one_line(error)}") from error
    features = datasets.Features(
        {
            "img": datasets.Image(),
            **{
                column: datasets.ClassLabel(names=[name.decode() for name in meta[names_key]])
                for column, (_, names_key) in layout["labels"].items()
            },
        }
    )
    return datasets.DatasetDict(
        {split: _cifar_dataset(split_batches, layout, features) for split, split_batches in batches.items()}
    )


def _cifar_dataset(batches: list[dict], layout: dict, features: datasets.Features) -> datasets.Dataset:
    # Rows are 3072 bytes: the red, green and blue 32x32 planes, each row-major.
    pixels = np.concatenate([batch[b"data"] for batch in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = {
        column: np.concatenate([batch[labels_key] for batch in batches])
        for column, (labels_key, _) in layout["labels"].items()
    }
    images = [{"bytes": _bmp(image), "path": None} for image in pixels]
    return datasets.Dataset.from_dict({"img": images, **labels}, features=features)


def _bmp(pixels: np.ndarray) -> bytes:
    # BMP is lossless and uncompressed: 40 us to encode a 32x32 image, against 320 us as PNG (60,000 of them here).
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="BMP")
    return buffer.getvalue()


def _find_columns(
    source: datasets.DatasetDict, image_column: str | None, label_column: str | None, name: str
) -> tuple[str, str, list[str]]:
    """The image and label columns (found by feature type unless named) and the class names."""
    features = next(iter(source.values())).features
    columns = ", ".join(features)
    for column in (image_column, label_column):
        if column is not None and column not in features:
            raise UserError(f"data set {name!r} has no column {column!r} (columns: {columns})")
    if image_column is None:
        image_column = next((column for column, kind in features.items() if isinstance(kind, datasets.Image)), None)
        if image_column is None:
            raise UserError(f"data set {name!r} has no Image column (columns: {columns}); name one in image_column")
    elif not isinstance(features[image_column], datasets.Image):
        raise UserError(f"column {image_column!r} of data set {name!r} is not an Image: {features[image_column]}")
    if label_column is None:
        class_labels = [column for column, kind in features.items() if isinstance(kind, datasets.ClassLabel)]
        preferred = [column for column in ("label", "fine_label") if column in class_labels] + class_labels
        if not preferred:
            raise UserError(
                f"data set {name!r} has no ClassLabel column (columns: {columns}); name one in label_column"
            )
        label_column = preferred[0]
    label = features[label_column]
    if isinstance(label, datasets.ClassLabel):
        return image_column, label_column, list(label.names)
    if not (isinstance(label, datasets.Value) and pa.types.is_integer(label.pa_type)):
        raise UserError(f"label column {label_column!r} of data set {name!r} is {label}, not a ClassLabel or integer")
    # Integer labels without names: classes 0..max over all splits, named by their numbers.
    largest = max(pc.max(dataset.with_format("arrow")[label_column]).as_py() or 0 for dataset in source.values())
    return image_column, label_column, [str(i) for i in range(largest + 1)]


def _select_split(source: datasets.DatasetDict, expression: str, name: str, field: str) -> datasets.Dataset:
    """The rows of a datasets split expression (`train[:98%]`, `train[:5000]+test`), as load_dataset's `split`."""
    try:
        instructions = datasets.ReadInstruction.from_spec(expression).to_absolute(
            {split: len(dataset) for split, dataset in source.items()}
        )
    except ValueError as error:
        raise UserError(f"data set {name!r}, {field} {expression!r}: {_one_line(error)}") from error
    parts = [source[part.splitname].select(range(part.from_, part.to)) for part in instructions if part.to > part.from_]
    if not parts:
        raise UserError(f"data set {name!r}, {field} {expression!r} is empty")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _check_labels(dataset: datasets.Dataset, column: str, num_classes: int, where: str) -> None:
    """Fail on the first missing label or label outside 0..num_classes-1."""
    labels = dataset.with_format("arrow")[column]
    values = pc.fill_null(labels, -1).to_numpy()
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        row = int(bad[0])
        raise UserError(
            f"data set {where}: row {row} has label {labels[row].as_py()} in column {column!r}, "
            f"outside 0..{num_classes - 1}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Loading: decode in the CPU workers, collate small uint8 batches.


class _WorkerUserError(UserError):
    """A UserError raised in a DataLoader worker: still one line when torch re-raises it in the main process."""

    def __init__(self, message: str):
        # torch re-raises a worker's error as type(error)(text), where text is the worker's traceback; its last line
        # is "<module>.<class name>: <message>".
        last_line = message.strip().splitlines()[-1]
        super().__init__(last_line.split(f"{type(self).__name__}: ", 1)[-1])


class _DecodedRows(torch.utils.data.Dataset):
    """Map-style rows (index, label, RGB image or None if undecodable), read a batch at a time from arrow."""

    def __init__(self, dataset: datasets.Dataset, image_column: str, label_column: str, bad_images: str):
        # The arrow format skips datasets' per-row decoding and formatting: a batch is one `take` of raw bytes.
        self.table = dataset.select_columns([image_column, label_column]).with_format("arrow")
        self.image_column = image_column
        self.label_column = label_column
        self.bad_images = bad_images

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[int, int, PIL.Image.Image | None]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[int, int, PIL.Image.Image | None]]:
        rows = self.table[indices]
        images = rows.column(self.image_column).to_pylist()
        labels = rows.column(self.label_column).to_pylist()
        return [
            (index, label, self._decode(index, image))
            for index, label, image in zip(indices, labels, images, strict=True)
        ]

    def _decode(self, index: int, image: dict) -> PIL.Image.Image | None:
        try:
            source = io.BytesIO(image["bytes"]) if image["bytes"] is not None else image["path"]
            with PIL.Image.open(source) as decoded:
                return _to_rgb(decoded)
        except Exception as error:  # PIL raises many kinds of error on a broken file
            if self.bad_images == "skip":
                return None
            raise _WorkerUserError(
                f"undecodable image in row {index}, column {self.image_column!r}: {_one_line(error)} "
                '(bad_images: "skip" drops such rows)'
            ) from error


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An 8-bit RGB copy of a decoded image: gray replicated, palette looked up, alpha dropped, 16 bit scaled."""
    if image.mode.startswith("I"):
        # PIL's own conversion of 16- or 32-bit integer gray clips at 255; scale [0, 65535] to [0, 255] instead.
        gray = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = PIL.Image.fromarray(((gray + 128) // 257).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the direct conversion to RGB warns about palette transparency
    return image.convert("RGB")


def _collate(rows: list[tuple[int, int, PIL.Image.Image | None]], image_size: int | None) -> dict:
    """Stack decoded rows into a batch of uint8 pixels, int64 labels and row indices, and count the skipped rows."""
    kept = [row for row in rows if row[2] is not None]
    indices = [index for index, _, _ in kept]
    images = [image for _, _, image in kept]
    # Images can only be stacked at one size. A batch whose images share a size keeps it (CIFAR stays 32 px: the
    # upsample to the model's size is done on the device). In a batch of mixed sizes, every image that is not
    # image_size x image_size is resized to it here, bilinear with antialias like the eval resize. This depends only
    # on which rows form the batch, so it is deterministic for a given seed.
    odd = next((i for i, image in enumerate(images) if image.size != images[0].size), None)
    if odd is not None:
        if image_size is None:
            raise _WorkerUserError(
                f"images of different sizes in one batch: row {indices[0]} is {_size(images[0])}, row "
                f"{indices[odd]} is {_size(images[odd])} (width x height); set image_size to resize them"
            )
        target = (image_size, image_size)
        images = [image if image.size == target else image.resize(target, PIL.Image.BILINEAR) for image in images]
    height, width = (images[0].height, images[0].width) if images else (image_size or 0, image_size or 0)
    pixels = np.empty((len(images), 3, height, width), dtype=np.uint8)
    for i, image in enumerate(images):
        pixels[i] = np.asarray(image).transpose(2, 0, 1)
    return {
        "pixels": torch.from_numpy(pixels),
        "labels": torch.tensor([label for _, label, _ in kept], dtype=torch.int64),
        "index": torch.tensor(indices, dtype=torch.int64),
        "skipped": torch.tensor(len(rows) - len(kept), dtype=torch.int64),
    }


def _size(image: PIL.Image.Image) -> str:
    return f"{image.width}x{image.height}"


def make_loader(
    dataset: datasets.Dataset,
    image_column: str,
    label_column: str,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    bad_images: str = "stop",
    image_size: int | None = None,
) -> DataLoader:
    """A DataLoader of uint8 batches {"pixels", "labels", "index", "skipped"}; see DeviceTransform for the rest.

    Shuffling draws from a generator seeded with `seed`. Undecodable images stop the loader with an error naming the
    row (bad_images="stop") or are left out of their batch and counted in "skipped" (bad_images="skip").
    `image_size` is where images of mixed sizes are resized to (see `_collate`).
    """
    if bad_images not in ("stop", "skip"):
        raise UserError(f'bad_images must be "stop" or "skip", not {bad_images!r}')
    missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
    if missing:
        raise UserError(f"data set has no column {missing[0]!r} (columns: {', '.join(dataset.column_names)})")
    rows = _DecodedRows(dataset, image_column, label_column, bad_images)
    # A plain DataLoader over a map-style data set: accelerate's `prepare` shards it across processes.
    sampler = RandomSampler(rows, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(rows)
    return DataLoader(
        rows,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(_collate, image_size=image_size),
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # The workers' base seed comes from here, not from the global RNG that dropout uses and checkpoints save.
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Device transforms: the official ViT preprocessing as batched tensor ops.


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] pixels to float32 [-1, 1], the input range of the original ViT checkpoints.

    Float pixels are rescaled in place: they are a transform's own full-size batch, and on a CPU a new tensor of that
    size (77 MB at 128 x 224 px) costs more to allocate than the rescaling itself.
    """
    if pixels.dtype == torch.uint8:
        return pixels.float().div_(127.5).sub_(1)
    return pixels.mul_(2).sub_(1)


def random_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: Sequence[float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(batch, 4) Inception-style random crops (top, left, height, width) of a height x width image, in pixels.

    As tf's sample_distorted_bounding_box and torchvision's RandomResizedCrop: an area fraction uniform in `scale`
    and an aspect ratio log-uniform in [3/4, 4/3]; the first of 10 attempts that fits in the image, else a central
    crop of the largest box with an aspect ratio in that range.
    """
    attempts = torch.rand(batch, 10, 2, generator=generator, device=device)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * attempts[..., 0])
    aspect = torch.exp(math.log(4 / 3) * (2 * attempts[..., 1] - 1))
    crop_width = torch.sqrt(area * aspect).round()
    crop_height = torch.sqrt(area / aspect).round()
    fits = (crop_width >= 1) & (crop_width <= width) & (crop_height >= 1) & (crop_height <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none does)
    found = fits.any(dim=1)
    crop_width = torch.where(found, crop_width.gather(1, first)[:, 0], min(width, round(height * 4 / 3)))
    crop_height = torch.where(found, crop_height.gather(1, first)[:, 0], min(height, round(width * 4 / 3)))
    offsets = torch.rand(batch, 2, generator=generator, device=device)
    # Uniform integer offsets in [0, size - crop]; the clamp guards against float32 rounding rand() * n up to n.
    top = torch.minimum((offsets[:, 0] * (height - crop_height + 1)).floor(), height - crop_height)
    left = torch.minimum((offsets[:, 1] * (width - crop_width + 1)).floor(), width - crop_width)
    top = torch.where(found, top, ((height - crop_height) / 2).floor())
    left = torch.where(found, left, ((width - crop_width) / 2).floor())
    return torch.stack([top, left, crop_height, crop_width], dim=1)


def _resize_weights(size: int, start: torch.Tensor, length: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, out_size, size) weights that resample [start, start + length) of an axis of `size` pixels to out_size.

    PIL's bilinear filter: a triangle one output pixel wide, widened to the scale when downsampling (antialias),
    centred on each output pixel; taps outside the image are dropped and each row sums to one.
    """
    scale = (length / out_size)[:, None, None]
    radius = scale.clamp(min=1)
    centres = start[:, None, None] + (torch.arange(out_size, device=start.device)[None, :, None] + 0.5) * scale
    taps = torch.arange(size, device=start.device) + 0.5
    # 1 - |distance| / radius, clamped at 0; in place, as each new (B, out_size, size) tensor costs page faults.
    weights = (taps - centres).div_(radius).abs_().neg_().add_(1).clamp_(min=0)
    return weights.div_(weights.sum(dim=2, keepdim=True))


class DeviceTransform:
    """The original ViT preprocessing of uint8 (B, 3, H, W) batches, as batched tensor ops on any device.

    train: an Inception-style random resized crop (`random_crop_boxes`, area fraction in crop_scale) resized to
    image_size, then a random horizontal flip if hflip; crop_scale=None leaves out the crop (a plain resize).
    eval: resize the whole image to image_size. Both end in [-1, 1] (`to_model_range`).

    Crop, resize and flip are one resampling with PIL's bilinear filter (antialiased when downsampling), written as
    two matrix products per sample with weights made for its crop box; a flip reverses the column weights. Where
    TF32 matmuls are allowed (CUDA), results stay within a quarter of a uint8 level (emulated: 0.22).
    """

    def __init__(
        self,
        image_size: int,
        train: bool,
        crop_scale: tuple[float, float] | None = (0.05, 1.0),
        hflip: bool = True,
    ):
        self.image_size = image_size
        self.crop_scale = crop_scale if train else None
        self.hflip = hflip and train

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) to float32 (B, 3, S, S) in [-1, 1]; random draws from `generator` (on pixels' device).

        The [-1, 1] scaling is applied to the small input: each output pixel is a weighted mean of input pixels
        (weights summing to one), so scaling commutes with the resampling and costs nothing at full size.
        """
        return self._resample(to_model_range(pixels), generator)

    def geometry(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Crop, resize and flip: uint8 (B, 3, H, W) to float32 (B, 3, S, S) in [0, 1], for augmentations of pixel
        values (RandAugment, TrivialAugment) that work on [0, 1] images before `to_model_range`."""
        return self._resample(pixels.float() / 255, generator)

    def _resample(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch, channels, height, width = images.shape
        device = images.device
        if self.crop_scale is None:
            boxes = torch.tensor([[0, 0, height, width]], dtype=torch.float32, device=device).expand(batch, 4)
        else:
            boxes = random_crop_boxes(batch, height, width, self.crop_scale, generator, device)
        top, left, crop_height, crop_width = boxes.unbind(dim=1)
        rows = _resize_weights(height, top, crop_height, self.image_size)
        columns = _resize_weights(width, left, crop_width, self.image_size)
        if self.hflip:
            flip = torch.rand(batch, generator=generator, device=device) < 0.5
            columns = torch.where(flip[:, None, None], columns.flip(dims=[1]), columns)
        # The width of all channels at once, (C * H, W) @ (W, S), then the height of each, (S, H) @ (H, S).
        wide = images.flatten(1, 2) @ columns.transpose(1, 2)
        return rows.unsqueeze(1) @ wide.view(batch, channels, height, self.image_size)
