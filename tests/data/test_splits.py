"""Splits of a data set read whole: percentages and row ranges cut from a seeded permutation stratified by class,
the stored order on request, and a minival that lacks classes refused.

The folder is real CIFAR-10 test images of 5 classes, written by PIL as an image folder, which datasets lists class
by class. The references are the files' class folders, datasets' own reading of the folder, and numpy counts.
"""

import collections
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from photos import cifar_images

from vit_hf.data.sources import load_splits
from vit_hf.data.splits import stratified_order
from vit_hf.utils.errors import UserError

FOLDER_CLASSES = {"airplane": 0, "bird": 2, "cat": 3, "ship": 8, "truck": 9}  # folder: CIFAR-10 label
PER_CLASS = 20


@pytest.fixture(scope="module")
def five_classes(cifar10_dir, tmp_path_factory) -> Path:
    """train/<class>/NN.png: 20 real CIFAR-10 images of each of 5 classes."""
    root = tmp_path_factory.mktemp("five_classes")
    for name, label in FOLDER_CLASSES.items():
        folder = root / "train" / name
        folder.mkdir(parents=True)
        images = cifar_images(cifar10_dir, label, PER_CLASS)
        assert len(images) == PER_CLASS
        for i, image in enumerate(images):
            image.save(folder / f"{i:02d}.png")
    return root


def folder_data(root: Path, **fields) -> dict:
    """A recipe's data section on the folder: train[:90%] and a minival of train[90%:]."""
    source = {"path": "imagefolder", "data_dir": str(root), "cache_dir": str(root.parent / f"{root.name}_cache")}
    return {"dataset": source, "train_split": "train[:90%]", "eval_split": "train[90%:]", "test_split": None, **fields}


def files(dataset: datasets.Dataset) -> list[str]:
    return [image["path"] for image in dataset.with_format("arrow")["image"].to_pylist()]


def class_counts(dataset: datasets.Dataset) -> dict[str, int]:
    """Rows of each class, by the folder each file lies in."""
    return dict(sorted(collections.Counter(Path(path).parent.name for path in files(dataset)).items()))


def all_files(root: Path) -> set[str]:
    return {str(path) for path in (root / "train").rglob("*.png")}


def test_the_minival_of_a_folder_stored_class_by_class_holds_every_class_in_proportion(five_classes):
    splits = load_splits(folder_data(five_classes))
    assert class_counts(splits.eval) == {name: 2 for name in sorted(FOLDER_CLASSES)}
    assert class_counts(splits.train) == {name: 18 for name in sorted(FOLDER_CLASSES)}
    # The labels are the folders' classes.
    labels = [splits.class_names[label] for label in splits.eval["label"][:]]
    assert labels == [Path(path).parent.name for path in files(splits.eval)]


def test_the_stored_order_gives_datasets_rows_and_only_warns_of_the_missing_classes(five_classes, caplog):
    data = folder_data(five_classes, split_order="stored")
    with caplog.at_level(logging.WARNING, logger="vit_hf.data.sources"):
        splits = load_splits(data)
    reference = datasets.load_dataset(**data["dataset"], split="train[90%:]")
    assert files(splits.eval) == files(reference)
    assert class_counts(splits.eval) == {"truck": 10}  # the last class folder: the old minival
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "data.eval_split 'train[90%:]'" in warnings[0], warnings
    assert "holds 1 of its 5 classes" in warnings[0] and '"stored"' in warnings[0]


@pytest.mark.parametrize(
    "train_split, eval_split",
    [("train[:90%]", "train[90%:]"), ("train[:37%]", "train[37%:]"), ("train[:33]", "train[33:]"),
     ("train[-93:]", "train[:-93]")],
)  # fmt: skip
def test_complementary_slices_share_no_row_and_miss_none(five_classes, train_split, eval_split):
    splits = load_splits(folder_data(five_classes, train_split=train_split, eval_split=eval_split))
    train, minival = files(splits.train), files(splits.eval)
    assert len(set(train)) == len(train) and len(set(minival)) == len(minival)
    assert not set(train) & set(minival)
    assert set(train) | set(minival) == all_files(five_classes)


def test_every_run_and_every_process_cuts_the_same_rows(five_classes, tmp_path):
    first, second = load_splits(folder_data(five_classes)), load_splits(folder_data(five_classes))
    assert files(first.eval) == files(second.eval) and files(first.train) == files(second.train)
    # Another process (as each process of a run loads its splits), with another hash seed.
    script = (
        "import json, sys\n"
        "from vit_hf.data.sources import load_splits\n"
        "splits = load_splits(json.loads(sys.argv[1]))\n"
        "print(json.dumps([image['path'] for image in splits.eval.with_format('arrow')['image'].to_pylist()]))\n"
    )
    data = folder_data(five_classes)
    data["dataset"]["cache_dir"] = str(tmp_path / "another_cache")
    environment = os.environ | {"PYTHONHASHSEED": "123"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(data)], capture_output=True, text=True,
                          env=environment, timeout=300, check=True)  # fmt: skip
    assert json.loads(done.stdout.splitlines()[-1]) == files(first.eval)


def test_split_seed_draws_other_rows_still_in_proportion(five_classes):
    default = load_splits(folder_data(five_classes))
    other = load_splits(folder_data(five_classes, split_seed=1))
    assert set(files(other.eval)) != set(files(default.eval))
    assert class_counts(other.eval) == {name: 2 for name in sorted(FOLDER_CLASSES)}
    assert not set(files(other.train)) & set(files(other.eval))


def test_a_minival_without_every_class_is_refused_in_one_line(five_classes):
    with pytest.raises(UserError) as caught:
        load_splits(folder_data(five_classes, eval_split="train[:3]"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data.eval_split 'train[:3]' of data set"), message
    assert "holds 3 of its 5 classes" in message and "choose a minival that holds every class" in message


def test_the_stratified_order_spreads_each_class_over_any_stretch():
    # Classes of very unequal sizes, in a random stored order.
    sizes = [50, 30, 15, 4, 1]
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(5), sizes))
    order = stratified_order(labels, seed=3, salt="train")
    assert sorted(order.tolist()) == list(range(len(labels)))
    cumulative = np.cumsum(np.eye(5, dtype=int)[labels[order]], axis=0)  # rows of each class in each prefix
    shares = np.outer(np.arange(1, len(labels) + 1), sizes) / len(labels)
    assert np.abs(cumulative - shares).max() <= 1  # any prefix within one row of its share
    assert not np.array_equal(order, stratified_order(labels, seed=4, salt="train"))
    assert np.array_equal(order, stratified_order(labels, seed=3, salt="train"))
