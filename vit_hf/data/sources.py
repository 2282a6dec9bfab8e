"""A recipe's data set and its train, minival and test splits (`load_splits`): Hub names, `datasets.load_dataset`
keyword arguments or a CIFAR archive, read whole or streamed."""

import dataclasses
import logging
from pathlib import Path

import datasets

# Its functions called through the module: benchmarks/stream_class_mix.py swaps shard_folder_streams there.
from vit_hf.data import streaming
from vit_hf.data.cifar_archive import read_cifar_archive
from vit_hf.data.labels import check_labels, class_balanced, find_columns, missing_classes
from vit_hf.data.messages import listed, one_line
from vit_hf.data.splits import RowOrder, select_split
from vit_hf.data.streaming import StreamSplit
from vit_hf.recipe import SPLIT_FIELDS, section_defaults
from vit_hf.utils.errors import UserError

logger = logging.getLogger(__name__)
HUB_NAMES = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
LOCAL_FILES_HINT = (
    'point the recipe\'s data.dataset at local files, e.g. {"path": "parquet", "data_files": {"train": ..., '
    '"test": ...}} or {"cifar_archive": "path/to/cifar-10-python.tar.gz"}'
)


@dataclasses.dataclass
class DataSplits:
    """The train, minival and test splits of one data set (None where skipped), and how to read them.

    With data.streaming the splits are `vit_hf.data.streaming.StreamSplit`s (shards of `datasets.IterableDataset`s,
    no length), read by `vit_hf.data.stream_loader.make_stream_loader`.
    """

    train: datasets.Dataset | StreamSplit | None
    eval: datasets.Dataset | StreamSplit | None
    test: datasets.Dataset | StreamSplit | None
    image_column: str
    label_column: str
    class_names: list[str]
    name: str
    train_subset: int | None  # rows of the train split kept by data.examples_per_class; None: all of them
    streaming: bool = False


def load_splits(data: dict, seed: int = 0, streaming_ok: bool = False) -> DataSplits:
    """Load the data set of a recipe's `data` section and cut its train, minival and test splits.

    Percentages and row ranges are cut from a stratified permutation that data.split_seed fixes, or with
    data.split_order "stored" from the stored order (`vit_hf.data.splits`). With data.examples_per_class K, the
    train split keeps K rows of each class, drawn with `seed` (the recipe's train.seed). With data.streaming (only
    where the caller reads streams: STREAMING_OK), the splits are streamed.
    """
    data = section_defaults("data") | data
    if data["streaming"]:
        return _stream_splits(data, streaming_ok)
    source, name = _load_source(data["dataset"])
    image_column, label_column, class_names = find_columns(source, data, name)
    order = RowOrder(data["split_order"], data["split_seed"], label_column)
    splits = {}
    for split, field in SPLIT_FIELDS.items():
        expression = data[field]
        if expression is None:
            splits[split] = None
            continue
        dataset = select_split(source, expression, name, field, order)
        check_labels(dataset, label_column, len(class_names), f"{name}, {field} {expression!r}")
        splits[split] = dataset
    if splits["eval"] is not None:
        _check_minival(splits["eval"], label_column, class_names, name, data)
    train_subset = None
    if data["examples_per_class"] is not None and splits["train"] is not None:
        where = f"data set {name!r}, train_split {data['train_split']!r}"
        splits["train"] = class_balanced(
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


def _check_minival(dataset: datasets.Dataset, column: str, class_names: list[str], name: str, data: dict) -> None:
    """Refuse a minival that lacks classes of the data set: the model kept as the best would be chosen on the
    classes it holds only. With data.split_order "stored", asked for explicitly, only warn."""
    missing = [class_names[label] for label in missing_classes(dataset, column, len(class_names))]
    if not missing:
        return
    problem = (
        f"data.eval_split {data['eval_split']!r} of data set {name!r} holds {len(class_names) - len(missing)} of its "
        f"{len(class_names)} classes (none of {listed(missing)}), so the best model would be chosen on those only"
    )
    if data["split_order"] == "stored":
        logger.warning('%s (data.split_order is "stored")', problem)
        return
    raise UserError(f"{problem}: choose a minival that holds every class (a larger slice, or another split)")


def _stream_splits(data: dict, streaming_ok: bool) -> DataSplits:
    """`load_splits` of a streamed data set (`vit_hf.data.streaming`): the splits' shards, nothing read but features."""
    if not streaming_ok:
        raise UserError("data.streaming: this command reads whole splits; set data.streaming to false for it")
    if data["examples_per_class"] is not None:
        raise UserError("data.examples_per_class: drawing rows of each class needs the whole split, not a stream")
    source, name = _load_source(data["dataset"], streaming=True)
    streaming.check_stream_features(source, name)
    if isinstance(data["dataset"], dict):
        source = streaming.shard_folder_streams(source, data["dataset"])
    image_column, label_column, class_names = find_columns(source, data, name, streaming=True)
    splits = {
        split: None if data[field] is None else streaming.stream_split(source, data[field], name, field)
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
        return read_cifar_archive(Path(dataset["cifar_archive"])), Path(dataset["cifar_archive"]).name
    name = _source_name(dataset)
    if "streaming" in dataset:
        raise UserError(f"data set {name!r}: stream with data.streaming, not a 'streaming' key in data.dataset")
    try:
        source = datasets.load_dataset(**dataset, streaming=streaming)
    except ConnectionError as error:
        raise UserError(f"could not fetch data set {name!r} ({one_line(error)}); {LOCAL_FILES_HINT}") from error
    except FileNotFoundError as error:
        raise UserError(f"data set {name!r}: {one_line(error)}") from error
    except datasets.exceptions.DatasetGenerationError as error:  # the cause is what went wrong in its builder
        raise UserError(
            f"data set {name!r}: datasets could not read it: {one_line(error.__cause__ or error)}"
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
