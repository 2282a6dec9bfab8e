"""Input pipeline: data sets and splits, uint8 batches from CPU workers, and the ViT preprocessing on the device.

The CPU workers only decode small images: a CIFAR batch leaves them as 32 px uint8 (a few hundred kB). The crop, the
resize to the model's size, the flip and the normalisation run afterwards as batched tensor ops on the training device
(`DeviceTransform`), where they cost little, instead of per image in PIL on a few CPU cores. Photos (larger than the
model's input, or of mixed sizes) are cropped from the original and resized in the workers instead, so that
image_size uint8 batches cross to the device; of a JPEG only the crop's region is decoded (vit_hf._jpeg), at reduced
scale where that loses nothing the crop needs.
"""

import dataclasses
import functools
import io
import math
import os
import pickle
import tarfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader

from vit_hf.recipe import SPLIT_FIELDS, section_defaults
from vit_hf.utils.errors import RunError, UserError

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

if TYPE_CHECKING:
    from vit_hf.data.streaming import StreamSplit

HUB_NAMES = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
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
    """The train, minival and test splits of one data set (None where skipped), and how to read them.

    With data.streaming the splits are `vit_hf.streaming.StreamSplit`s (shards of `datasets.IterableDataset`s, no
    length), read by `vit_hf.streaming.make_stream_loader`.
    """

    train: "datasets.Dataset | StreamSplit | None"
    eval: "datasets.Dataset | StreamSplit | None"
    test: "datasets.Dataset | StreamSplit | None"
    image_column: str
    label_column: str
    class_names: list[str]
    name: str
    train_subset: int | None  # rows of the train split kept by data.examples_per_class; None: all of them
    streaming: bool = False


def load_splits(data: dict, seed: int = 0, streaming_ok: bool = False) -> DataSplits:
    """Load the data set of a recipe's `data` section and cut its train, minival and test splits.

    With data.examples_per_class K, the train split keeps K rows of each class, drawn with `seed` (the recipe's
    train.seed). With data.streaming (only where the caller reads streams: STREAMING_OK), the splits are streamed.
    """
    data = section_defaults("data") | data
    if data["streaming"]:
        return _stream_splits(data, streaming_ok)
    source, name = _load_source(data["dataset"])
    image_column, label_column, class_names = _find_columns(source, data, name)
    splits = {}
    for split, field in SPLIT_FIELDS.items():
        expression = data[field]
        if expression is None:
            splits[split] = None
            continue
        dataset = _select_split(source, expression, name, field)
        _check_labels(dataset, label_column, len(class_names), f"{name}, {field} {expression!r}")
        splits[split] = dataset
    train_subset = None
    if data["examples_per_class"] is not None and splits["train"] is not None:
        where = f"data set {name!r}, train_split {data['train_split']!r}"
        splits["train"] = _class_balanced(
            splits["train"], label_column, class_names, data["examples_per_class"], seed, where
        )
        train_subset = len(splits["train"])
    return DataSplits(
        **splits,
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        name=name,
        train_subset=train_subset,
    )


def _stream_splits(data: dict, streaming_ok: bool) -> DataSplits:
    """`load_splits` of a streamed data set (`vit_hf.streaming`): the splits' shards, nothing read but features."""
    from vit_hf.data.streaming import check_stream_features, shard_folder_streams, stream_split

    if not streaming_ok:
        raise UserError("data.streaming: this command reads whole splits; set data.streaming to false for it")
    if data["examples_per_class"] is not None:
        raise UserError("data.examples_per_class: drawing rows of each class needs the whole split, not a stream")
    source, name = _load_source(data["dataset"], streaming=True)
    check_stream_features(source, name)
    if isinstance(data["dataset"], dict):
        source = shard_folder_streams(source, data["dataset"])
    image_column, label_column, class_names = _find_columns(source, data, name, streaming=True)
    splits = {
        split: None if data[field] is None else stream_split(source, data[field], name, field)
        for split, field in SPLIT_FIELDS.items()
    }
    return DataSplits(**splits, image_column=image_column, label_column=label_column, class_names=class_names,
                      name=name, train_subset=None, streaming=True)  # fmt: skip


def _load_source(
    dataset: str | dict, streaming: bool = False
) -> tuple[datasets.DatasetDict | datasets.IterableDatasetDict, str]:
    """All splits of the data set a recipe names (as streams: IterableDatasets), and a readable name of it."""
    if isinstance(dataset, str):
        if dataset not in HUB_NAMES:
            raise UserError(
                f"unknown data set name {dataset!r}: use one of {', '.join(HUB_NAMES)}, "
                'or the keyword arguments of datasets.load_dataset, e.g. {"path": "imagefolder", "data_dir": ...}'
            )
        dataset = {"path": HUB_NAMES[dataset]}
    if "cifar_archive" in dataset:
        if streaming:
            raise UserError("data.streaming: a CIFAR archive is read whole; point data.dataset at parquet files")
        return _read_cifar_archive(Path(dataset["cifar_archive"])), Path(dataset["cifar_archive"]).name
    name = _source_name(dataset)
    if "streaming" in dataset:
        raise UserError(f"data set {name!r}: stream with data.streaming, not a 'streaming' key in data.dataset")
    try:
        source = datasets.load_dataset(**dataset, streaming=streaming)
    except ConnectionError as error:
        raise UserError(f"could not fetch data set {name!r} ({_one_line(error)}); {LOCAL_FILES_HINT}") from error
    except FileNotFoundError as error:
        raise UserError(f"data set {name!r}: {_one_line(error)}") from error
    except datasets.exceptions.DatasetGenerationError as error:  # the cause is what went wrong in its builder
        raise UserError(
            f"data set {name!r}: datasets could not read it: {_one_line(error.__cause__ or error)}"
        ) from error
    if not isinstance(source, datasets.IterableDatasetDict if streaming else datasets.DatasetDict):
        raise UserError(
            f"data set {name!r}: load_dataset must return all splits (no 'split' or 'streaming' keys); "
            "choose splits with train_split, eval_split and test_split, stream with data.streaming"
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


# Integer label columns taken when no column is a ClassLabel: webdataset's class index is its `.cls` file.
INTEGER_LABEL_COLUMNS = ("label", "labels", "cls", "fine_label")


def _find_columns(
    source: datasets.DatasetDict | datasets.IterableDatasetDict, data: dict, name: str, streaming: bool = False
) -> tuple[str, str, list[str]]:
    """The image and label columns (found by feature type unless named) and the class names (data.class_names, the
    ClassLabel's, or for integer labels of a split read whole the numbers 0..max)."""
    features = next(iter(source.values())).features
    columns = ", ".join(features)
    image_column, label_column, names = data["image_column"], data["label_column"], data["class_names"]
    for column in (image_column, label_column):
        if column is not None and column not in features:
            raise UserError(f"data set {name!r} has no column {column!r} (columns: {columns})")
    if image_column is None:
        image_column = next((column for column, kind in features.items() if isinstance(kind, datasets.Image)), None)
        if image_column is None:
            raise UserError(f"data set {name!r} has no Image column (columns: {columns}); name one in image_column")
    elif not isinstance(features[image_column], datasets.Image):
        raise UserError(f"column {image_column!r} of data set {name!r} is not an Image: {features[image_column]}")
    label_column = label_column or _label_column(features, name)
    label = features[label_column]
    if isinstance(label, datasets.ClassLabel):
        if names is not None and len(names) != label.num_classes:
            raise UserError(
                f"data.class_names: {len(names)} names, but column {label_column!r} of data set {name!r} has "
                f"{label.num_classes} classes ({_listed(label.names)})"
            )
        return image_column, label_column, list(names or label.names)
    if not (isinstance(label, datasets.Value) and pa.types.is_integer(label.pa_type)):
        raise UserError(f"label column {label_column!r} of data set {name!r} is {label}, not a ClassLabel or integer")
    if names is not None:
        return image_column, label_column, list(names)
    if streaming:
        raise UserError(
            f"data.class_names: column {label_column!r} of the stream of {name!r} holds integers, not a ClassLabel, "
            "and a stream cannot be read whole to count its classes: list them in data.class_names"
        )
    # Integer labels without names: classes 0..max over all splits, named by their numbers.
    largest = max(pc.max(dataset.with_format("arrow")[label_column]).as_py() or 0 for dataset in source.values())
    return image_column, label_column, [str(i) for i in range(largest + 1)]


def _label_column(features: datasets.Features, name: str) -> str:
    """The label column of a data set that names none: a ClassLabel (label, then fine_label, first), else an
    integer column of a conventional name."""
    class_labels = [column for column, kind in features.items() if isinstance(kind, datasets.ClassLabel)]
    preferred = [column for column in ("label", "fine_label") if column in class_labels] + class_labels
    integers = [
        column
        for column in INTEGER_LABEL_COLUMNS
        if isinstance(features.get(column), datasets.Value) and pa.types.is_integer(features[column].pa_type)
    ]
    if not preferred + integers:
        raise UserError(
            f"data set {name!r} has no ClassLabel column and no integer {' / '.join(INTEGER_LABEL_COLUMNS)} column "
            f"(columns: {', '.join(features)}); name one in label_column"
        )
    return (preferred + integers)[0]


def _listed(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


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


def _class_balanced(
    dataset: datasets.Dataset, column: str, class_names: list[str], per_class: int, seed: int, where: str
) -> datasets.Dataset:
    """PER_CLASS rows of each class, drawn without replacement by a generator seeded with SEED, in split order."""
    labels = dataset.with_format("arrow")[column].to_numpy()
    rng = np.random.default_rng(seed % 2**64)  # numpy takes non-negative seeds only
    chosen = []
    for label, class_name in enumerate(class_names):
        rows = np.flatnonzero(labels == label)
        if len(rows) < per_class:
            raise UserError(
                f"data.examples_per_class: {per_class} asked, but class {class_name!r} has {len(rows)} rows in {where}"
            )
        chosen.append(rng.choice(rows, per_class, replace=False))
    return dataset.select(np.sort(np.concatenate(chosen)))


# ---------------------------------------------------------------------------------------------------------------------
# Loading: decode in the CPU workers, collate uint8 batches.


class _EpochSampler(torch.utils.data.Sampler):
    """(row, epoch) pairs: the rows of one epoch, shuffled or in order, each with the epoch it is drawn for.

    The workers draw a row's crop and flip from (seed, epoch, row), so the epoch travels with each row index to
    whichever worker of whichever process reads it (persistent workers hold their own copy of the data set: an epoch
    set on it in the main process would not reach them). Epoch e's order is `torch.randperm` seeded with seed + e,
    the order accelerate's SeedableRandomSampler gave the loop (data_seed=seed). This is no RandomSampler, so
    accelerate's `prepare` keeps it: its `set_epoch` reaches this sampler through BatchSamplerShard, and
    `skip_first_batches` shares it. A plain loader's next pass takes the next epoch.
    """

    def __init__(self, size: int, shuffle: bool, seed: int):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        epoch = self.epoch
        if self.shuffle:
            rows = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            rows = range(self.size)
        for row in rows:
            yield row, epoch
        self.epoch = epoch + 1


class _Rows(torch.utils.data.Dataset):
    """Map-style rows (index, epoch, label, encoded image) for (row, epoch) pairs, read a batch at a time from arrow."""

    def __init__(self, dataset: datasets.Dataset, image_column: str, label_column: str):
        # The arrow format skips datasets' per-row decoding and formatting: a batch is one `take` of raw bytes.
        self.table = dataset.select_columns([image_column, label_column]).with_format("arrow")
        self.image_column = image_column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, pair: tuple[int, int]) -> tuple[int, int, int, dict]:
        return self.__getitems__([pair])[0]

    def __getitems__(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int, int, dict]]:
        rows = self.table[[row for row, _ in pairs]]
        images = rows.column(self.image_column).to_pylist()
        labels = rows.column(self.label_column).to_pylist()
        return [(row, epoch, label, image) for (row, epoch), label, image in zip(pairs, labels, images, strict=True)]


class _FailedBatch(dict):
    """The batch the collate returns when it cannot make one: reading any key raises its UserError there.

    An exception raised in a worker reaches the main process only as torch's text of its traceback; a batch arrives
    intact, through pinning and accelerate's move to the device (both copy it with `items()`), with workers or not.
    """

    def __getitem__(self, key: str):
        error = UserError if dict.get(self, "exit_code", 2) == 2 else RunError  # 1: the data could not be read
        raise error(dict.get(self, "error"))


_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class _Collate:
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

    def __call__(self, rows: list[tuple[int, int, int, dict]]) -> dict:
        try:
            return self._batch(rows)
        except UserError as error:
            return _FailedBatch(error=str(error))

    def _batch(self, rows: list[tuple[int, int, int, dict]]) -> dict:
        opened = [
            (row, epoch, label, self._read(row, functools.partial(_open, image))) for row, epoch, label, image in rows
        ]
        opened = [entry for entry in opened if entry[3] is not None]
        sizes = {image.size for *_, image in opened}  # as the image is seen: EXIF orientation applied
        if len(sizes) > 1 and self.image_size is None:
            first_row, *_, first = opened[0]
            odd_row, *_, odd = next(entry for entry in opened if entry[3].size != first.size)
            raise UserError(
                f"images of different sizes in one batch: row {first_row} is {_size(first)}, row {odd_row} is "
                f"{_size(odd)} (width x height); set image_size to resize them"
            )
        size = self.image_size
        prepared = size is not None and (len(sizes) > 1 or any(max(w, h) > size for w, h in sizes))
        if prepared:
            arrays = self._prepare(opened)
        else:
            arrays = [self._read(row, functools.partial(_pixels, image)) for row, *_, image in opened]
        kept = [
            (row, label, array) for (row, _, label, _), array in zip(opened, arrays, strict=True) if array is not None
        ]
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
            "prepared": prepared,
        }

    def _read(self, row: int, read: Callable[[], _T]) -> _T | None:
        """read(), or None for an undecodable image if bad_images is "skip" (else a UserError naming the row)."""
        try:
            return read()
        except Exception as error:  # PIL raises many kinds of error on a broken file
            if self.bad_images == "skip":
                return None
            raise UserError(
                f"undecodable image in row {row}, column {self.image_column!r}: {_one_line(error)} "
                '(bad_images: "skip" drops such rows)'
            ) from error

    def _prepare(self, opened: list[tuple[int, int, int, "_Opened"]]) -> list[np.ndarray | None]:
        """Each image as an (S, S, 3) uint8 view (None: undecodable, skipped): a crop box of the original image
        resized to S = image_size, and flipped at random.

        The boxes and the flips follow DeviceTransform: `random_crop_boxes` on each image's own size as it is seen,
        EXIF orientation applied (the whole image when crop_scale is None, i.e. for eval), then a coin if hflip; each
        row draws them from its own generator, a function of (seed, epoch, row) only, so a resumed run, any worker
        count and any process count see the same crops. The box is cut out and resized with PIL's bilinear filter
        (`_resized`, as `_resize_weights` does on the device); of a JPEG only the box's region is decoded
        (`_decoded_box`), at reduced scale where the box allows (`_draft_scale`).
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
            self._crop(row, image, box.tolist(), self.hflip and bool(flip))
            for (row, *_, image), box, flip in zip(opened, boxes, flips, strict=True)
        ]

    def _crop(self, row: int, opened: "_Opened", box: list[float], flip: bool) -> np.ndarray | None:
        """The box (top, left, height, width) of the image as seen, resized to image_size and flipped if `flip`.

        The box is cut from the stored pixels where it lies there, and the small result oriented afterwards, so that
        no full-size image is transposed: for EXIF flips (orientations 2-4) this equals `exif_transpose` first; for
        the orientations that swap the axes (5-8) the two resize passes run in the other order, and the uint8
        rounding between them differs by one level at most, in about 1% of the values (300-640 px photos of
        `bench_data --make-photos`, 224 px) and up to 7% on smooth gradients (tests/test_photos.py, 64 px).
        """
        swap, flip_rows, flip_columns = opened.orientation
        top, left, box_height, box_width = _stored_box(box, opened.orientation, opened.size)
        stored_box = (left, top, left + box_width, top + box_height)
        decoded = self._read(row, functools.partial(_decoded_box, opened, stored_box, self.image_size))
        if decoded is None:
            return None
        resized = _resized(*decoded, self.image_size)
        # The result is a copy: free the decoded photo now, not with the batch, so a worker's memory does not grow
        # with the batch size (32 JPEGs of 4032x3024, 224 px crops: peak RSS +32 MB instead of +88 MB).
        opened.image.close()
        return _oriented(resized, (swap, flip_rows, flip_columns != flip))


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
class _Opened:
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


def _open(image: dict) -> _Opened:
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
    return _Opened(opened, _ORIENTATIONS.get(orientation, _AS_STORED), image["bytes"])


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


def _pixels(opened: _Opened) -> np.ndarray:
    """The whole image, oriented, as an (H, W, 3) uint8 view."""
    return _oriented(np.asarray(_to_rgb(opened.image)), opened.orientation)


def _stored_box(box: list[float], orientation: tuple[bool, bool, bool], size: tuple[int, int]) -> list[float]:
    """A box (top, left, height, width) of the image as seen (of `size`, width x height) in the stored pixels."""
    swap, flip_rows, flip_columns = orientation
    top, left, height, width = box
    if flip_rows:
        top = size[1] - top - height
    if flip_columns:
        left = size[0] - left - width
    return [left, top, width, height] if swap else [top, left, height, width]


def _oriented(pixels: np.ndarray, orientation: tuple[bool, bool, bool]) -> np.ndarray:
    """(H, W, C) stored pixels as seen: a view (swap the axes, then flip the rows, then the columns)."""
    swap, flip_rows, flip_columns = orientation
    if swap:
        pixels = pixels.transpose(1, 0, 2)
    if flip_rows:
        pixels = pixels[::-1]
    return pixels[:, ::-1] if flip_columns else pixels


def _resized(pixels: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The box (left, top, right, bottom) of decoded (H, W, 3 or 4) uint8 pixels (RGB, or RGB and an unused byte),
    cut out and resized to size x size with PIL's bilinear filter (a triangle widened to the scale when
    downsampling), as an (S, S, 3) uint8 view.

    Cut, then resized, as the official input pipeline (a slice of the decoded image, then the resize), torchvision's
    RandomResizedCrop and the transformers example do: the filter's taps stop at the box. A box in whole pixels (any
    box of an image decoded at full size) is resized by torch's uint8 antialiased bilinear `interpolate`, PIL's
    filter in fixed point (SIMD kernels): 0.26-0.31 ms instead of PIL's 0.94-1.00 ms for a 300 px box of a 480 px
    photo to 224 px (2-core AMD EPYC with AVX-512, 2026-12-02, fourth session), within 1 level of PIL's crop +
    resize in 0.2-0.3% of the values of photos (it rounds the pass between the two axes on its own). A box in
    fractional pixels (a JPEG decoded at reduced scale, `_draft_scale`) is cut to the whole pixels around it and
    resized by PIL, which resamples from fractional coordinates.
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
    # Copied to rows of its own first: the kernel resizes a box with rows of the box's width about twice as fast as one
    # inside the photo's wider rows (400 px box of a 600 px photo to 224 px: 0.24 ms + 0.03 ms for the copy, against
    # 0.45 ms; crops of the bench's 300-640 px photos: 0.35 ms against 0.48 ms; 2-core CPU, 2026-12-02), same result.
    crop = crop.contiguous(memory_format=torch.channels_last)
    resized = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
    return resized[0, :3].permute(1, 2, 0).numpy()  # channels last, as the input: a view


def _array(image: PIL.Image.Image) -> np.ndarray:
    """An RGB image's pixels as an (H, W, 3) uint8 array: a view of PIL's own storage where PIL exports it through
    Arrow (Pillow >= 11.2, single-block images), else a copy.

    `np.asarray` copies through PIL's raw encoder; the view leaves one copy, into the batch: 224 px, 2-core CPU,
    2026-12-02: 86 us instead of 136 us an image for both.
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


def _row_generator(seed: int, epoch: int, row: int) -> torch.Generator:
    """The random source of one row's crop and flip in one epoch."""
    # SeedSequence spreads the three numbers over the whole state (it takes non-negative entropy only).
    state = np.random.SeedSequence([seed % 2**64, epoch, row]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _decoded_box(
    opened: _Opened, box: tuple[float, float, float, float], size: int
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
    opened: _Opened, box: tuple[float, float, float, float], scale: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The rows and columns of a JPEG decoded at 1/scale that the box (in that output's pixels) lies in, as (H, W, 4)
    RGBX pixels, and the box within them.

    libjpeg-turbo skips the rows above, keeps to the box's columns and stops below (vit_hf/_jpeg.c): the region's
    pixels equal a full decode's, bit for bit, with one column more on each side, where a region's edge would lack
    the neighbour that the upsampling of subsampled chroma reads. For the bench's 300-640 px photos and their 224 px
    train crops, 0.33 ms instead of 0.63 ms an image for Pillow's full decode (2-core AMD EPYC, 2026-12-02).
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

    libjpeg scales while it decodes (its DCT at reduced size), at a fraction of the cost of a full decode. Against a
    full decode with the same box and resize, on CIFAR test images upscaled to mixed sizes and saved as JPEG
    (quality 90), 224 px out, images drafted at 1/2 (300-640 px, eval and train crops): 0.25 uint8 levels mean
    absolute difference, 4 at most; at 1/2 to 1/8 (900-2000 px): 0.21 mean, 3 at most. Small outputs differ more: at
    40 px out (81-900 px photos, 1/2 to 1/8) 0.45 mean, 14 at most (2-core CPU, 2026-12-01).
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
    crop_scale: Sequence[float] | None = None,
    hflip: bool = False,
) -> DataLoader:
    """A DataLoader of uint8 batches {"pixels", "labels", "index", "skipped", "prepared"}, for DeviceTransform.

    Epoch e's shuffle and its random crops depend on (seed, e) only; `set_epoch` chooses e. Undecodable images stop
    the loader with an error naming the row (bad_images="stop") or are left out of their batch and counted in
    "skipped" (bad_images="skip"); an error is raised where the batch is read. Batches of images larger than
    `image_size`, or of mixed sizes, are brought to image_size in the workers ("prepared": see `_Collate`): the whole
    image resized, or with crop_scale a random crop of it (and a random flip if hflip), as the training
    DeviceTransform with these settings would do.
    """
    if bad_images not in ("stop", "skip"):
        raise UserError(f'bad_images must be "stop" or "skip", not {bad_images!r}')
    missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
    if missing:
        raise UserError(f"data set has no column {missing[0]!r} (columns: {', '.join(dataset.column_names)})")
    rows = _Rows(dataset, image_column, label_column)
    # A plain DataLoader over a map-style data set: accelerate's `prepare` shards it across processes.
    return DataLoader(
        rows,
        batch_size=batch_size,
        sampler=_EpochSampler(len(rows), shuffle, seed),
        num_workers=num_workers,
        collate_fn=_Collate(image_column, bad_images, image_size, crop_scale, hflip, seed),
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
    offsets = torch.rand(batch, 2, generator=generator, device=device)
    return crop_boxes(attempts, offsets, height, width, scale)


def crop_boxes(
    attempts: torch.Tensor,
    offsets: torch.Tensor,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale: Sequence[float],
) -> torch.Tensor:
    """The boxes of `random_crop_boxes` from its uniform draws, attempts (B, 10, 2) and offsets (B, 2), for images
    of one size (ints) or of one size each ((B,) tensors)."""
    batch, device = len(attempts), attempts.device
    height = torch.as_tensor(height, dtype=torch.float32, device=device).expand(batch)
    width = torch.as_tensor(width, dtype=torch.float32, device=device).expand(batch)
    area = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * attempts[..., 0])
    aspect = torch.exp(math.log(4 / 3) * (2 * attempts[..., 1] - 1))
    crop_width = torch.sqrt(area * aspect).round()
    crop_height = torch.sqrt(area / aspect).round()
    fits = (crop_width >= 1) & (crop_width <= width[:, None]) & (crop_height >= 1) & (crop_height <= height[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none does)
    found = fits.any(dim=1)
    crop_width = torch.where(found, crop_width.gather(1, first)[:, 0], torch.minimum(width, (height * 4 / 3).round()))
    crop_height = torch.where(found, crop_height.gather(1, first)[:, 0], torch.minimum(height, (width * 4 / 3).round()))
    # Uniform integer offsets in [0, size - crop]; the clamp guards against float32 rounding rand() * n up to n.
    top = torch.minimum((offsets[:, 0] * (height - crop_height + 1)).floor(), height - crop_height)
    left = torch.minimum((offsets[:, 1] * (width - crop_width + 1)).floor(), width - crop_width)
    top = torch.where(found, top, ((height - crop_height) / 2).floor())
    left = torch.where(found, left, ((width - crop_width) / 2).floor())
    return torch.stack([top, left, crop_height, crop_width], dim=1)


def _resize_weights(size: int, start: torch.Tensor, length: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, out_size, size) weights that resample [start, start + length) of an axis of `size` pixels to out_size.

    PIL's bilinear filter: a triangle one output pixel wide, widened to the scale when downsampling (antialias),
    centred on each output pixel. The box is cut out, then resized (as the official pipeline, torchvision and the
    workers' `_resized` do): taps outside it are dropped, and each row sums to one.
    """
    scale = (length / out_size)[:, None, None]
    radius = scale.clamp(min=1)
    start, end = start[:, None, None], (start + length)[:, None, None]
    centres = start + (torch.arange(out_size, device=start.device)[None, :, None] + 0.5) * scale
    taps = torch.arange(size, device=start.device) + 0.5
    # 1 - |distance| / radius, clamped at 0; in place, as each new (B, out_size, size) tensor costs page faults.
    weights = (taps - centres).div_(radius).abs_().neg_().add_(1).clamp_(min=0)
    weights.mul_((taps > start) & (taps < end))
    return weights.div_(weights.sum(dim=2, keepdim=True))


class DeviceTransform:
    """The original ViT preprocessing of uint8 (B, 3, H, W) batches, as batched tensor ops on any device.

    train: an Inception-style random resized crop (`random_crop_boxes`, area fraction in crop_scale) resized to
    image_size, then a random horizontal flip if hflip; crop_scale=None leaves out the crop (a plain resize).
    eval: resize the whole image to image_size. Both end in [-1, 1] (`to_model_range`).

    Crop, resize and flip are one resampling with PIL's bilinear filter (antialiased when downsampling), written as
    two matrix products per sample with weights made for its crop box; a flip reverses the column weights. Where
    TF32 matmuls are allowed (CUDA), results stay within a quarter of a uint8 level (emulated: 0.22).

    A batch the loader's workers prepared (its "prepared" key: large or mixed-size images, already cropped, resized
    and flipped there from the originals, see `make_loader`) is only scaled: pass prepared=True. Without a crop or
    a flip, an image_size x image_size batch is already the result (the resize is the identity), so eval needs no
    flag.
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

    def __call__(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, prepared: bool = False
    ) -> torch.Tensor:
        """uint8 (B, 3, H, W) to float32 (B, 3, S, S) in [-1, 1]; random draws from `generator` (on pixels' device).

        The [-1, 1] scaling is applied to the small input: each output pixel is a weighted mean of input pixels
        (weights summing to one), so scaling commutes with the resampling and costs nothing at full size.
        """
        images = to_model_range(pixels)
        return images if prepared else self._resample(images, generator)

    def geometry(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, prepared: bool = False
    ) -> torch.Tensor:
        """Crop, resize and flip: uint8 (B, 3, H, W) to float32 (B, 3, S, S) in [0, 1], for augmentations of pixel
        values (RandAugment, TrivialAugment) that work on [0, 1] images before `to_model_range`."""
        images = pixels.float() / 255
        return images if prepared else self._resample(images, generator)

    def _resample(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch, channels, height, width = images.shape
        device = images.device
        if self.crop_scale is None and not self.hflip and height == width == self.image_size:
            return images
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
