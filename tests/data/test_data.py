"""The input pipeline: data sets and splits, the uint8 loader, and the device transforms.

Reference values come from PIL, numpy, pyarrow, `datasets` itself and transformers' ViT image processor.
"""

import io
import math
import os
import pickle
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.ndimage
import torch
from accelerate.data_loader import SeedableRandomSampler, prepare_data_loader, skip_first_batches
from photos import cifar_images, png_declaring
from PIL import Image, JpegImagePlugin
from pil_resize import assert_resized_as_pil
from transformers.image_utils import PILImageResampling

# Without torchvision, transformers 5's ViTImageProcessor falls back to (and returns) this PIL implementation.
from transformers.models.vit import ViTImageProcessorPil

from vit_hf.data import batches as batches_module
from vit_hf.data import photos as photos_module
from vit_hf.data.loader import make_loader
from vit_hf.data.sources import load_splits
from vit_hf.data.transforms import DeviceTransform, random_crop_boxes, to_model_range
from vit_hf.recipe import resolve_recipe
from vit_hf.utils.errors import UserError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# PIL's bilinear resize rounds to uint8 twice (after its horizontal and after its vertical pass, each within half a
# level, and the second pass carries the first one's error with weights that sum to one); our float resize does not
# round. So the two differ by at most one level of 255, i.e. 1/127.5 in [-1, 1] (1/255 in [0, 1]), plus float noise.
PIL_ROUNDING = 1 / 127.5 + 1e-5


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """A fresh datasets cache: tests neither read nor fill the user's."""
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


@pytest.fixture(scope="module")
def cifar_source(cifar10_dir: Path, cache_dir: str) -> dict:
    files = {"train": str(cifar10_dir / "train.parquet"), "test": str(cifar10_dir / "test.parquet")}
    return {"path": "parquet", "data_files": files, "cache_dir": cache_dir}


@pytest.fixture(scope="module")
def cifar(cifar_source: dict):
    """A few thousand real CIFAR-10 images, the first of the train split (compared with the parquet's rows)."""
    return load_splits(
        {"dataset": cifar_source, "train_split": "train[:2000]", "eval_split": "train[2000:2500]", "test_split": None,
         "split_order": "stored"}
    )  # fmt: skip


def train_only(dataset: str | dict, **fields) -> dict:
    """A recipe's data section that loads only the whole train split, unless fields say otherwise."""
    return {"dataset": dataset, "train_split": "train", "eval_split": None, "test_split": None, **fields}


def first_batch(dataset: datasets.Dataset, image_column: str = "image", label_column: str = "label", **options):
    options = {"batch_size": len(dataset), "shuffle": False, **options}
    return next(iter(make_loader(dataset, image_column, label_column, **options)))


def one_line_error(call, *words: str) -> str:
    """Call, expect a UserError of one line that holds every word; return its message."""
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    return message


def parquet_source(folder: Path, splits: dict[str, datasets.Dataset]) -> dict:
    """Write splits as parquet files (datasets keeps the features in them) and return the recipe's `dataset`."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, dataset in splits.items():
        dataset.to_parquet(folder / f"{split}.parquet")
    files = {split: str(folder / f"{split}.parquet") for split in splits}
    return {"path": "parquet", "data_files": files, "cache_dir": str(folder / "cache")}


def image_dataset(images: list[Image.Image], labels: list[int], num_classes: int = 3) -> datasets.Dataset:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(num_classes)])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy())


CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar10_archive(folder: Path, batches: dict, labels: dict, protocol: int | None = None) -> Path:
    members = {"batches.meta": {b"label_names": [name.encode() for name in CIFAR10_CLASSES], b"num_vis": 3072}}
    for name in CIFAR10_BATCHES:
        members[name] = {b"batch_label": name.encode(), b"data": batches[name], b"labels": labels[name]}
    return write_archive(folder / "cifar-10-python.tar.gz", "cifar-10-batches-py", members, protocol)


def write_archive(path: Path, folder: str, members: dict[str, dict], protocol: int | None = None) -> Path:
    """A tar.gz of pickles with bytes keys, as the official CIFAR python archives; with protocol 2, pickled as the
    official ones (under numpy.core, numpy 1's name of numpy._core)."""
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            data = pickle.dumps(content, protocol=protocol)
            if protocol == 2:
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Data sets and splits


def test_cifar10_parquet_gives_columns_classes_and_name(cifar):
    assert (cifar.image_column, cifar.label_column) == ("img", "label")
    assert cifar.class_names == CIFAR10_CLASSES
    assert cifar.name == "cifar10"
    assert (len(cifar.train), len(cifar.eval), cifar.test) == (2000, 500, None)


def test_default_splits_are_the_official_minival_and_test_with_the_stored_order(cifar_source):
    splits = load_splits({"dataset": cifar_source, "split_order": "stored"})
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (49_000, 1_000, 10_000)
    minival = datasets.load_dataset(**cifar_source, split="train[98%:]")
    assert splits.eval["label"][:] == minival["label"][:]


def test_default_splits_draw_a_stratified_minival_disjoint_from_train(cifar_source):
    splits = load_splits({"dataset": cifar_source})
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (49_000, 1_000, 10_000)
    # CIFAR-10's train split holds 5,000 images of each class: 2% of each is 100.
    assert np.bincount(splits.eval["label"][:], minlength=10).tolist() == [100] * 10
    train, minival = set(stored_images(splits.train)), set(stored_images(splits.eval))
    everything = stored_images(datasets.load_dataset(**cifar_source, split="train"))
    assert not train & minival and train | minival == set(everything) and len(set(everything)) == 50_000


@pytest.mark.parametrize("expression", ["train[:5000]", "train[33%:34%]", "train[:10]+test[-5:]", "test"])
def test_split_expressions_select_the_rows_load_dataset_selects(cifar_source, expression):
    splits = load_splits(train_only(cifar_source, train_split=expression, split_order="stored"))
    reference = datasets.load_dataset(**cifar_source, split=expression)
    assert splits.train["label"][:] == reference["label"][:]
    assert splits.eval is None and splits.test is None


def test_cifar10_archive_reads_as_the_hub_schema_with_split_expressions(tmp_path):
    rng = np.random.default_rng(0)
    batches = {name: rng.integers(0, 256, (6, 3072), dtype=np.uint8) for name in CIFAR10_BATCHES}
    labels = {name: rng.integers(0, 10, 6).tolist() for name in CIFAR10_BATCHES}
    archive = write_cifar10_archive(tmp_path, batches, labels)

    splits = load_splits(
        {"dataset": {"cifar_archive": str(archive)}, "train_split": "train[:80%]", "eval_split": "train[80%:]",
         "split_order": "stored"}
    )  # fmt: skip

    assert (splits.image_column, splits.label_column, splits.name) == ("img", "label", "cifar-10-python.tar.gz")
    assert splits.class_names == CIFAR10_CLASSES
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (24, 6, 6)
    # Train is data_batch_1..5 in order; a row is the red, green and blue 32x32 planes.
    train_pixels = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    train_labels = sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    batch = first_batch(splits.eval, "img")
    assert torch.equal(batch["pixels"], torch.from_numpy(train_pixels[24:]))
    assert batch["labels"].tolist() == train_labels[24:]
    batch = first_batch(splits.test, "img")
    assert torch.equal(batch["pixels"], torch.from_numpy(batches["test_batch"].reshape(-1, 3, 32, 32)))
    assert batch["labels"].tolist() == labels["test_batch"]


def test_cifar100_archive_has_fine_and_coarse_labels(tmp_path):
    rng = np.random.default_rng(1)
    fine_names = [f"fine{i}" for i in range(100)]
    coarse_names = [f"coarse{i}" for i in range(20)]
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }
    members = {"meta": meta}
    for split in ("train", "test"):
        members[split] = {
            b"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8),
            b"fine_labels": rng.integers(0, 100, 5).tolist(),
            b"coarse_labels": rng.integers(0, 20, 5).tolist(),
        }
    archive = write_archive(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", members)

    fine = load_splits(train_only({"cifar_archive": str(archive)}, test_split="test"))
    assert (fine.label_column, fine.class_names) == ("fine_label", fine_names)
    assert fine.test["fine_label"][:] == members["test"][b"fine_labels"]
    coarse = load_splits(train_only({"cifar_archive": str(archive)}, test_split="test", label_column="coarse_label"))
    assert coarse.class_names == coarse_names
    assert coarse.test["coarse_label"][:] == members["test"][b"coarse_labels"]


class _Shell:
    """Unpickled, it would run a shell command: what a doctored archive could hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_an_archive_that_pickles_a_call_is_refused_unread(tmp_path):
    rng = np.random.default_rng(2)
    batches = {name: rng.integers(0, 256, (2, 3072), dtype=np.uint8) for name in CIFAR10_BATCHES}
    labels = {name: [0, 1] for name in CIFAR10_BATCHES}
    marker = tmp_path / "the_command_ran"
    batches["data_batch_3"] = _Shell(f"touch {marker}")
    archive = write_cifar10_archive(tmp_path, batches, labels)
    message = one_line_error(lambda: load_splits(train_only({"cifar_archive": str(archive)})))
    assert message == (
        f"CIFAR archive cifar-10-python.tar.gz: data_batch_3 pickles {os.system.__module__}.system, which no CIFAR "
        "batch holds: refused unread (only dicts, lists, bytes, numbers and numpy arrays are loaded)"
    )
    assert not marker.exists()


def test_an_archive_pickled_as_the_official_ones_reads(tmp_path):
    # The official archives are Python 2 pickles (protocol 2) of numpy arrays under numpy.core's names.
    rng = np.random.default_rng(3)
    batches = {name: rng.integers(0, 256, (2, 3072), dtype=np.uint8) for name in CIFAR10_BATCHES}
    labels = {name: rng.integers(0, 10, 2).tolist() for name in CIFAR10_BATCHES}
    archive = write_cifar10_archive(tmp_path, batches, labels, protocol=2)
    with tarfile.open(archive) as opened:
        pickled = opened.extractfile("cifar-10-batches-py/data_batch_1").read()
    assert b"numpy.core.multiarray" in pickled and b"_reconstruct" in pickled
    splits = load_splits(train_only({"cifar_archive": str(archive)}, split_order="stored"))
    assert splits.train["label"][:] == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    pixels = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(first_batch(splits.train, "img")["pixels"], torch.from_numpy(pixels))


def stored_images(dataset: datasets.Dataset, column: str = "img") -> list[bytes]:
    return [image["bytes"] for image in dataset.with_format("arrow")[column].to_pylist()]


def test_examples_per_class_keeps_a_seeded_class_balanced_subset_of_train(cifar_source):
    data = train_only(cifar_source, train_split="train[:1000]", examples_per_class=5, split_order="stored")
    subset = load_splits(data, seed=1)
    assert np.bincount(subset.train["label"][:], minlength=10).tolist() == [5] * 10
    assert subset.train_subset == len(subset.train) == 50
    split = set(stored_images(datasets.load_dataset(**cifar_source, split="train[:1000]")))
    assert set(stored_images(subset.train)) <= split
    assert stored_images(load_splits(data, seed=1).train) == stored_images(subset.train)
    assert set(stored_images(load_splits(data, seed=2).train)) != set(stored_images(subset.train))
    assert load_splits(train_only(cifar_source, train_split="train[:1000]")).train_subset is None


def test_examples_per_class_beyond_a_class_or_below_one_is_named(cifar_source):
    # train[:200] holds 12 to 26 images of each class.
    data = train_only(cifar_source, train_split="train[:200]", examples_per_class=30, split_order="stored")
    one_line_error(lambda: load_splits(data), "data.examples_per_class", "30", "train[:200]")
    one_line_error(lambda: resolve_recipe({"data": {"examples_per_class": 0}}), "data.examples_per_class", "positive")


def test_a_skipped_split_is_none(cifar_source):
    splits = load_splits(train_only(cifar_source, train_split="test[:10]"))
    assert (len(splits.train), splits.eval, splits.test) == (10, None, None)


# ---------------------------------------------------------------------------------------------------------------------
# Columns


def labelled(columns: dict, features: dict) -> datasets.Dataset:
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def test_columns_are_found_by_type_preferring_label_then_fine_label(tmp_path):
    names = datasets.ClassLabel(names=["a", "b"])
    images = [random_image(8, 8, seed) for seed in range(2)]
    plain = labelled(
        {"photo": images, "kind": [0, 1], "label": [1, 0]}, {"photo": datasets.Image(), "kind": names, "label": names}
    )
    splits = load_splits(train_only(parquet_source(tmp_path / "plain", {"train": plain})))
    assert (splits.image_column, splits.label_column) == ("photo", "label")

    cifar100_like = labelled(
        {"img": images, "coarse_label": [0, 1], "fine_label": [1, 0]},
        {"img": datasets.Image(), "coarse_label": names, "fine_label": names},
    )
    splits = load_splits(train_only(parquet_source(tmp_path / "fine", {"train": cifar100_like})))
    assert splits.label_column == "fine_label"


def test_named_columns_override_detection(tmp_path):
    images = [random_image(8, 8, seed) for seed in range(2)]
    features = {
        "photo": datasets.Image(),
        "mask": datasets.Image(),
        "label": datasets.ClassLabel(names=["a", "b"]),
        "kind": datasets.ClassLabel(names=["x", "y", "z"]),
    }
    data = labelled({"photo": images, "mask": images[::-1], "label": [0, 1], "kind": [2, 0]}, features)
    source = parquet_source(tmp_path, {"train": data})
    splits = load_splits(train_only(source, image_column="mask", label_column="kind"))
    assert (splits.image_column, splits.label_column, splits.class_names) == ("mask", "kind", ["x", "y", "z"])


def test_an_integer_label_column_gets_numbered_classes(tmp_path):
    data = labelled(
        {"image": [random_image(8, 8, s) for s in range(3)], "y": [0, 4, 2]},
        {"image": datasets.Image(), "y": datasets.Value("int64")},
    )
    source = parquet_source(tmp_path, {"train": data})
    splits = load_splits(train_only(source, label_column="y"))
    assert splits.class_names == ["0", "1", "2", "3", "4"]


def test_class_names_name_an_integer_label_column_found_by_its_conventional_name(tmp_path):
    # webdataset's class index is an integer `.cls` column: taken as the labels where no column is a ClassLabel.
    data = labelled(
        {"jpg": [random_image(8, 8, s) for s in range(3)], "cls": [0, 2, 1], "__key__": ["a", "b", "c"]},
        {"jpg": datasets.Image(), "cls": datasets.Value("int64"), "__key__": datasets.Value("string")},
    )
    source = parquet_source(tmp_path, {"train": data})
    assert load_splits(train_only(source)).class_names == ["0", "1", "2"]
    splits = load_splits(train_only(source, class_names=["cat", "dog", "ship", "frog"]))
    assert (splits.image_column, splits.label_column, splits.class_names) == (
        "jpg",
        "cls",
        ["cat", "dog", "ship", "frog"],
    )
    one_line_error(lambda: load_splits(train_only(source, class_names=["cat", "dog"])), "row 1", "label 2", "0..1")


def test_class_names_rename_a_class_label_of_as_many_classes(small_source):
    assert load_splits(train_only(small_source, class_names=["x", "y", "z"])).class_names == ["x", "y", "z"]
    one_line_error(
        lambda: load_splits(train_only(small_source, class_names=["x", "y"])),
        "data.class_names",
        "2 names",
        "3 classes",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Bad data: one-line errors that name what is wrong


@pytest.fixture
def small_source(tmp_path) -> dict:
    data = image_dataset([random_image(8, 8, seed) for seed in range(4)], [0, 1, 2, 1])
    return parquet_source(tmp_path, {"train": data, "test": data})


def test_a_missing_column_is_named(small_source):
    one_line_error(lambda: load_splits(train_only(small_source, image_column="photo")), "'photo'", "image, label")
    one_line_error(lambda: load_splits(train_only(small_source, label_column="fine")), "'fine'")


def test_an_image_column_must_hold_images(small_source):
    one_line_error(lambda: load_splits(train_only(small_source, image_column="label")), "'label'", "not an Image")


def test_the_loader_names_a_missing_column():
    data = image_dataset([random_image(8, 8, 0)], [0])
    one_line_error(lambda: make_loader(data, "img", "label", 1, shuffle=False), "'img'", "image, label")


def test_no_class_label_and_no_label_column_is_an_error(tmp_path):
    data = labelled(
        {"image": [random_image(8, 8, 0)], "y": [0]}, {"image": datasets.Image(), "y": datasets.Value("int64")}
    )
    source = parquet_source(tmp_path, {"train": data})
    one_line_error(lambda: load_splits(train_only(source)), "no ClassLabel", "label_column")


@pytest.mark.parametrize("bad_label", [-1, 3])
def test_a_label_out_of_range_names_split_row_and_column(tmp_path, bad_label):
    # ClassLabel allows -1 (no label); a cast lets a label >= the number of classes through.
    data = datasets.Dataset.from_dict({"image": [random_image(8, 8, s) for s in range(3)], "label": [0, 2, bad_label]})
    data = data.cast_column("image", datasets.Image()).cast_column("label", datasets.ClassLabel(names=["a", "b", "c"]))
    source = parquet_source(tmp_path, {"train": data})
    one_line_error(
        lambda: load_splits(train_only(source)), "train_split", "row 2", f"label {bad_label}", "'label'", "0..2"
    )


def test_an_empty_or_unknown_split_is_named(small_source):
    one_line_error(lambda: load_splits(train_only(small_source, eval_split="train[:0]")), "eval_split", "empty")
    one_line_error(lambda: load_splits(train_only(small_source, eval_split="train[99%:]")), "eval_split", "empty")
    one_line_error(
        lambda: load_splits(train_only(small_source, test_split="validation")), "test_split", "validation", "train"
    )


def test_unknown_names_and_missing_files_are_named(tmp_path):
    one_line_error(lambda: load_splits({"dataset": "cifar11"}), "cifar11", "cifar10")
    missing = tmp_path / "cifar-10-python.tar.gz"
    one_line_error(lambda: load_splits({"dataset": {"cifar_archive": str(missing)}}), str(missing))
    missing_dir = {"path": "imagefolder", "data_dir": str(tmp_path / "nowhere"), "cache_dir": str(tmp_path / "c")}
    one_line_error(lambda: load_splits({"dataset": missing_dir}), "nowhere")


def test_an_unreachable_hub_tells_how_to_use_local_files(monkeypatch, tmp_path):
    # conftest.py sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, and an empty cache rules out a copy cached earlier:
    # datasets raises ConnectionError for a Hub data set.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    one_line_error(lambda: load_splits({"dataset": "cifar10"}), "uoft-cs/cifar10", '"parquet"', "cifar_archive")


def broken_dataset() -> datasets.Dataset:
    images = [{"bytes": png_bytes(random_image(8, 8, seed)), "path": None} for seed in range(4)]
    images[2] = {"bytes": b"not an image", "path": None}
    return image_dataset(images, [0, 1, 2, 1])


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_undecodable_image_stops_the_loader_naming_the_row(num_workers):
    loader = make_loader(broken_dataset(), "image", "label", 4, shuffle=False, num_workers=num_workers)
    # The batch carries the error from the worker: reading it raises, in the process that reads it.
    batch = next(iter(loader))
    one_line_error(lambda: batch["pixels"], "row 2", "'image'", "undecodable", '(bad_images: "skip" drops such rows)')


def folder_with_broken_files(root: Path) -> Path:
    """An image folder of 4 PNGs in 2 classes, a file that is no image and a JPEG cut short (it opens, and fails
    when decoded)."""
    for i in range(4):
        folder = root / "train" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        random_image(40, 30, i).save(folder / f"{i}.png")
    (root / "train" / "a" / "broken.png").write_bytes(b"not an image")
    buffer = io.BytesIO()
    random_image(40, 30, 9).save(buffer, "JPEG")
    (root / "train" / "b" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return root


@pytest.mark.parametrize("image_size", [None, 16])  # decoded whole, or cropped and resized in the workers
def test_an_undecodable_file_of_a_folder_is_named_by_its_path_and_split(tmp_path, image_size):
    root = folder_with_broken_files(tmp_path / "photos")
    source = {"path": "imagefolder", "data_dir": str(root), "cache_dir": str(tmp_path / "cache")}
    train = load_splits(train_only(source, train_split="train")).train
    paths = [image["path"] for image in train.with_format("arrow")["image"].to_pylist()]
    broken = {name: paths.index(str(root / "train" / name)) for name in ("a/broken.png", "b/cut.jpg")}
    for name, row in broken.items():
        batch = first_batch(train.select([row]), image_size=image_size)
        message = one_line_error(lambda: batch["pixels"])  # noqa: B023 (called at once)
        path = root / "train" / name
        assert message.startswith(f"undecodable image {path} (split 'train', row 0), column 'image': "), message
        assert message.endswith('(bad_images: "skip" drops such rows)')
    # The whole split: the file that does not even open stops it, named by its row in the split.
    batch = first_batch(train, image_size=image_size)
    path, row = root / "train" / "a" / "broken.png", broken["a/broken.png"]
    one_line_error(lambda: batch["pixels"], f"undecodable image {path} (split 'train', row {row})")
    skipped = first_batch(train, image_size=image_size, bad_images="skip")
    assert skipped["skipped_rows"].tolist() == sorted(broken.values()) and len(skipped["index"]) == 4


def test_a_photo_past_pillows_size_limit_is_an_undecodable_row_not_a_crash():
    # Pillow's decompression bomb guard (200M pixels declared) raises at open, not an OSError.
    images = broken_dataset()
    images = image_dataset([*images["image"][:2], {"bytes": png_declaring(20000, 10000), "path": None}], [0, 1, 2])
    batch = first_batch(images, bad_images="skip", image_size=8)
    assert batch["index"].tolist() == [0, 1] and batch["skipped"].item() == 1
    batch = first_batch(images, image_size=8)
    one_line_error(lambda: batch["pixels"], "row 2", "undecodable", "exceeds limit")


def test_a_row_without_an_image_is_named_as_such():
    data = datasets.Dataset.from_dict({"image": [random_image(8, 8, 0), None], "label": [0, 1]})
    data = data.cast_column("image", datasets.Image())
    assert first_batch(data, bad_images="skip")["skipped"].item() == 1
    batch = first_batch(data)
    one_line_error(lambda: batch["pixels"], "row 1", "the row has no image (null)")


def test_skipped_images_are_left_out_and_counted():
    batch = first_batch(broken_dataset(), bad_images="skip")
    assert batch["index"].tolist() == [0, 1, 3] and batch["skipped_rows"].tolist() == [2]
    assert batch["labels"].tolist() == [0, 1, 1]
    assert batch["pixels"].shape == (3, 3, 8, 8)
    assert batch["skipped"].item() == 1


# ---------------------------------------------------------------------------------------------------------------------
# The loader


def test_cifar_batches_stay_32px_uint8_and_hold_the_stored_images(cifar, cifar10_dir):
    loader = make_loader(cifar.train, "img", "label", 64, shuffle=False, image_size=224)
    batch = next(iter(loader))
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (64, 3, 32, 32)
    assert batch["labels"].dtype == torch.int64 and batch["index"].tolist() == list(range(64))
    stored = pq.read_table(cifar10_dir / "train.parquet").slice(0, 64).to_pylist()
    expected = torch.stack([chw(Image.open(io.BytesIO(row["img"]["bytes"]))) for row in stored])
    assert torch.equal(batch["pixels"], expected)
    assert batch["labels"].tolist() == [row["label"] for row in stored]


def test_workers_deliver_each_row_once_with_its_label(cifar):
    loader = make_loader(cifar.eval, "img", "label", 64, shuffle=True, seed=3, num_workers=2)
    batches = list(loader)
    index = torch.cat([batch["index"] for batch in batches])
    assert sorted(index.tolist()) == list(range(len(cifar.eval)))
    labels = torch.cat([batch["labels"] for batch in batches])
    assert labels.tolist() == [cifar.eval[i]["label"] for i in index.tolist()]
    assert batches[-1]["pixels"].shape[0] == len(cifar.eval) % 64


def test_shuffling_is_deterministic_under_a_seed():
    data = image_dataset([random_image(4, 4, seed) for seed in range(32)], [0] * 32)

    def order(batch_size=8, **options):
        loader = make_loader(data, "image", "label", batch_size, **options)
        return torch.cat([batch["index"] for batch in loader]).tolist()

    assert order(shuffle=True, seed=5) == order(shuffle=True, seed=5)
    assert order(shuffle=True, seed=5) != order(shuffle=True, seed=6)
    assert sorted(order(shuffle=True, seed=5)) == order(shuffle=False) == list(range(32))
    assert len(order(shuffle=True, seed=5, drop_last=True, batch_size=10)) == 30


def test_odd_image_modes_become_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    rgba = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
    deep = rng.integers(0, 65536, (24, 24), dtype=np.uint16)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    palette_image = Image.frombytes("P", (24, 24), gray.tobytes())
    palette_image.putpalette(palette.tobytes())
    transparent = palette_image.copy()
    transparent.info["transparency"] = 7
    # Each folder (a class of the imagefolder) holds one image and the RGB pixels it must give, made with numpy.
    cases = {
        "gray": (Image.fromarray(gray), "png", np.repeat(gray[..., None], 3, axis=2)),
        "palette": (palette_image, "png", palette[gray]),
        "palette_transparent": (transparent, "png", palette[gray]),
        "rgba": (Image.fromarray(rgba), "png", rgba[..., :3]),
        "gray_alpha": (Image.fromarray(rgba[..., :2]), "png", np.repeat(rgba[..., :1], 3, axis=2)),
        # 16 bit scales to 8 bit: round(x / 257), so 0 -> 0 and 65535 -> 255.
        "gray16": (Image.fromarray(deep), "png", np.repeat(np.round(deep / 257).astype(np.uint8)[..., None], 3, 2)),
        "gray32": (Image.fromarray(deep.astype(np.int32)), "tiff", np.repeat(np.round(deep / 257)[..., None], 3, 2)),
    }
    for name, (image, extension, _) in cases.items():
        (tmp_path / "images" / name).mkdir(parents=True)
        image.save(tmp_path / "images" / name / f"0.{extension}")
    assert Image.open(tmp_path / "images" / "gray16" / "0.png").mode == "I;16"
    assert Image.open(tmp_path / "images" / "gray32" / "0.tiff").mode == "I"
    source = {"path": "imagefolder", "data_dir": str(tmp_path / "images"), "cache_dir": str(tmp_path / "cache")}

    splits = load_splits(train_only(source))

    assert splits.name == "images" and sorted(splits.class_names) == sorted(cases)
    batch = first_batch(splits.train)
    assert batch["pixels"].shape == (len(cases), 3, 24, 24)
    for pixels, label in zip(batch["pixels"], batch["labels"], strict=True):
        expected = cases[splits.class_names[label]][2]
        assert torch.equal(pixels, torch.from_numpy(expected.astype(np.uint8).transpose(2, 0, 1).copy()))


def test_images_of_mixed_sizes_or_larger_than_image_size_are_resized_whole_in_the_workers():
    images = [random_image(24, 24, 0), random_image(40, 30, 1), random_image(24, 24, 2)]
    data = image_dataset(images, [0, 1, 2])
    one_line_error(lambda: first_batch(data)["pixels"], "row 0 is 24x24", "row 1 is 40x30", "image_size")

    # Without a crop the workers do the eval transform: the whole image resized, as PIL does it.
    batch = first_batch(data, image_size=24)
    assert batch["prepared"]
    assert torch.equal(batch["pixels"][0], chw(images[0])) and torch.equal(batch["pixels"][2], chw(images[2]))
    assert_resized_as_pil(batch["pixels"][1], chw(images[1].resize((24, 24), Image.BILINEAR)))
    batch = first_batch(data, image_size=16)
    references = torch.stack([chw(image.resize((16, 16), Image.BILINEAR)) for image in images])
    assert_resized_as_pil(batch["pixels"], references)
    # A batch of one size larger than image_size is resized there too; one no larger keeps its size for the device.
    batch = first_batch(data.select([0, 2]), image_size=16)
    assert batch["prepared"] and batch["pixels"].shape == (2, 3, 16, 16)
    batch = first_batch(data.select([0, 2]), image_size=32)
    assert not batch["prepared"] and torch.equal(batch["pixels"], torch.stack([chw(images[0]), chw(images[2])]))


# ---------------------------------------------------------------------------------------------------------------------
# Photos: larger or mixed-size images are cropped from the original and resized in the workers


@pytest.fixture(scope="module")
def photos(cifar10_dir) -> list[Image.Image]:
    """Six real photos of mixed sizes and aspect ratios: CIFAR-10 test images enlarged (bicubic) to 90-300 px."""
    sizes = [(300, 120), (96, 180), (200, 200), (150, 90), (240, 260), (90, 300)]
    images = [image for label in (3, 5, 8) for image in cifar_images(cifar10_dir, label, 2)]
    return [image.resize(size, Image.BICUBIC) for image, size in zip(images, sizes, strict=True)]


def encoded_dataset(images: list[Image.Image], kind: str = "PNG", **options) -> datasets.Dataset:
    """IMAGES stored as files of one format (PNG: lossless, and no reduced-scale decoding)."""
    files = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format=kind, **options)
        files.append({"bytes": buffer.getvalue(), "path": None})
    return image_dataset(files, [0] * len(files))


def decoded(dataset: datasets.Dataset) -> list[Image.Image]:
    """The stored images, fully decoded by PIL."""
    return [
        Image.open(io.BytesIO(image["bytes"])).convert("RGB")
        for image in dataset.with_format("arrow")["image"].to_pylist()
    ]


def fixed_boxes(monkeypatch, boxes: list[list[int]]) -> None:
    """Have the workers cut these crop boxes (top, left, height, width) instead of random ones."""
    monkeypatch.setattr(batches_module, "crop_boxes", lambda *draws: torch.tensor(boxes, dtype=torch.float32))


def test_worker_crops_are_cut_from_the_original_photo_then_resized(photos, monkeypatch):
    boxes = [
        [10, 20, 100, 150],
        [0, 0, 180, 96],
        [50, 30, 60, 80],
        [5, 5, 80, 140],
        [100, 40, 150, 120],
        [200, 10, 90, 70],
    ]
    fixed_boxes(monkeypatch, boxes)
    batch = first_batch(encoded_dataset(photos), image_size=64, crop_scale=(0.05, 1.0))
    assert batch["prepared"] and batch["pixels"].shape == (6, 3, 64, 64)
    for image, (top, left, height, width), pixels in zip(photos, boxes, batch["pixels"], strict=True):
        # The independent reference: PIL cuts the box out of the original, then resizes it.
        assert_resized_as_pil(
            pixels, chw(image.crop((left, top, left + width, top + height)).resize((64, 64), Image.BILINEAR))
        )


def test_square_features_of_a_wide_photo_stay_square_in_the_training_crops():
    # A 4:1 canvas of black 24 px squares on white: squashed to a square first, they would become 1:4.
    canvas = np.full((120, 480, 3), 255, np.uint8)
    for top in range(8, 120 - 24, 40):
        for left in range(8, 480 - 24, 40):
            canvas[top : top + 24, left : left + 24] = 0
    loader = make_loader(
        encoded_dataset([Image.fromarray(canvas)] * 16), "image", "label", 16, shuffle=True,
        image_size=64, crop_scale=(0.05, 1.0), hflip=True,
    )  # fmt: skip
    aspects = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for pixels in next(iter(loader))["pixels"]:
            squares, _ = scipy.ndimage.label(pixels[0].numpy() < 128)
            for rows, columns in scipy.ndimage.find_objects(squares):
                if rows.start > 0 and columns.start > 0 and rows.stop < 64 and columns.stop < 64:  # whole squares
                    aspects.append((columns.stop - columns.start) / (rows.stop - rows.start))
    assert len(aspects) > 40
    # The crop boxes' aspect ratios are in [3/4, 4/3]; a square 13 px or more across is measured to a pixel.
    assert min(aspects) >= 3 / 4 * 12 / 13 and max(aspects) <= 4 / 3 * 13 / 12


def worker_crops(
    dataset: datasets.Dataset, epoch: int = 0, **options
) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
    """The rows of each batch of one epoch, and each row's pixels, from a shuffling training loader of photos."""
    options = {"shuffle": True, "image_size": 48, "crop_scale": (0.05, 1.0), "hflip": True} | options
    loader = make_loader(dataset, "image", "label", 4, **options)
    loader.sampler.set_epoch(epoch)
    batches = list(loader)
    assert all(batch["prepared"] for batch in batches)
    pixels = {
        row: image for batch in batches for row, image in zip(batch["index"].tolist(), batch["pixels"], strict=True)
    }
    return [batch["index"].tolist() for batch in batches], pixels


def test_worker_crops_depend_on_seed_epoch_and_row_only(photos):
    dataset = encoded_dataset(photos * 2)  # rows i and i + 6 hold the same photo
    order, crops = worker_crops(dataset, seed=3)
    workers_order, workers_crops = worker_crops(dataset, seed=3, num_workers=2)
    assert workers_order == order and all(torch.equal(crops[row], workers_crops[row]) for row in crops)
    for _, other in (worker_crops(dataset, epoch=1, seed=3), worker_crops(dataset, seed=4)):
        assert sum(torch.equal(crops[row], other[row]) for row in crops) <= 1
    assert not any(torch.equal(crops[row], crops[row + 6]) for row in range(6))


def test_sharded_and_resumed_loaders_give_each_row_its_crop_of_the_whole_loader(photos):
    # As the loop prepares its loader (accelerate, use_seedable_sampler=True) on each of 2 processes, and resumes it.
    dataset = encoded_dataset(photos * 4)
    order, crops = worker_crops(dataset, epoch=1, seed=5, drop_last=True)
    for process in (0, 1):
        shard = prepare_data_loader(
            make_loader(dataset, "image", "label", 4, shuffle=True, seed=5, drop_last=True, image_size=48,
                        crop_scale=(0.05, 1.0), hflip=True),
            num_processes=2, process_index=process, use_seedable_sampler=True, data_seed=5,
        )  # fmt: skip
        shard.set_epoch(1)
        batches = list(shard)
        shard.set_epoch(1)
        resumed = list(skip_first_batches(shard, 2))
        assert [batch["index"].tolist() for batch in batches] == order[process::2]
        assert [batch["index"].tolist() for batch in resumed] == order[process::2][2:]
        for batch in batches + resumed:
            assert all(
                torch.equal(crops[row], pixels)
                for row, pixels in zip(batch["index"].tolist(), batch["pixels"], strict=True)
            )


def test_each_epoch_is_shuffled_as_accelerates_seedable_sampler_shuffled_the_loop():
    data = image_dataset([random_image(4, 4, seed) for seed in range(50)], [0] * 50)
    loader = make_loader(data, "image", "label", 50, shuffle=True, seed=7)
    for epoch in (0, 1, 2):
        loader.sampler.set_epoch(epoch)
        theirs = SeedableRandomSampler(data_source=range(50), generator=torch.Generator(), data_seed=7)
        theirs.set_epoch(epoch)
        assert next(iter(loader))["index"].tolist() == list(theirs)


def scale_for(width: float, height: float, size: int) -> int:
    """The JPEG scale a box of width x height needs for SIZE px: the largest 1/s that keeps both sides >= SIZE."""
    return max(s for s in (1, 2, 4, 8) if width / s >= size and height / s >= size)


@pytest.fixture
def drafts(monkeypatch, jpeg_decoder) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(size before, size after) of each reduced-scale JPEG decode the pipeline asks for, of either decoder."""
    calls = []
    if jpeg_decoder == "pillow":
        original = JpegImagePlugin.JpegImageFile.draft

        def spy(image, mode, size):
            before = image.size
            result = original(image, mode, size)
            calls.append((before, image.size))
            return result

        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    else:
        decode_region = photos_module._jpeg.decode_region

        def spy(data, out, scale, *region):
            if scale > 1:
                width, height = Image.open(io.BytesIO(data)).size
                calls.append(((width, height), (math.ceil(width / scale), math.ceil(height / scale))))
            return decode_region(data, out, scale, *region)

        monkeypatch.setattr(photos_module, "_jpeg", type("Spy", (), {"decode_region": staticmethod(spy)}))
    return calls


def test_eval_decodes_jpegs_at_reduced_scale_only_down_to_the_model_size(photos, drafts):
    sizes = [(400, 330), (170, 500), (150, 130), (700, 160), (320, 330), (90, 75)]
    big = [image.resize(size, Image.BICUBIC) for image, size in zip(photos, sizes, strict=True)]
    jpegs = encoded_dataset(big, "JPEG", quality=95)
    batch = first_batch(jpegs, image_size=40)
    scales = [scale_for(*size, 40) for size in sizes]
    assert scales == [8, 4, 2, 4, 8, 1]
    assert drafts == [
        (size, (math.ceil(size[0] / s), math.ceil(size[1] / s))) for size, s in zip(sizes, scales, strict=True) if s > 1
    ]
    full = torch.stack([chw(image.resize((40, 40), Image.BILINEAR)) for image in decoded(jpegs)])
    difference = (batch["pixels"].int() - full.int()).abs()
    # The decoder's DCT scaling alone (see photos._draft_scale).
    assert difference.float().mean() < 1 and difference.max() <= 20
    assert_resized_as_pil(batch["pixels"][5], full[5])  # not reduced: the full decode, resized
    # PNG has no reduced-scale decoding: the full decode and resize.
    drafts.clear()
    pngs = encoded_dataset(big)
    references = torch.stack([chw(i.resize((40, 40), Image.BILINEAR)) for i in big])
    assert_resized_as_pil(first_batch(pngs, image_size=40)["pixels"], references)
    assert drafts == []


def test_training_decodes_a_jpeg_at_reduced_scale_only_as_far_as_its_crop_box_allows(photos, drafts, monkeypatch):
    photo = photos[2].resize((640, 480), Image.BICUBIC)
    boxes = [[0, 0, 70, 70], [100, 50, 170, 180], [10, 10, 400, 330], [0, 0, 480, 640]]
    fixed_boxes(monkeypatch, boxes)
    jpegs = encoded_dataset([photo] * 4, "JPEG", quality=95)
    batch = first_batch(jpegs, image_size=40, crop_scale=(0.05, 1.0))
    scales = [scale_for(width, height, 40) for _, _, height, width in boxes]
    assert scales == [1, 4, 8, 8]
    assert [before[0] // after[0] for before, after in drafts] == [s for s in scales if s > 1]
    original = decoded(jpegs)[0]
    for (top, left, height, width), s, pixels in zip(boxes, scales, batch["pixels"], strict=True):
        assert width / s >= 40 and height / s >= 40  # the reduced box still has the output's resolution
        full = chw(original.crop((left, top, left + width, top + height)).resize((40, 40), Image.BILINEAR))
        difference = (pixels.int() - full.int()).abs()
        assert difference.float().mean() < 1 and difference.max() <= 20
        if s == 1:
            assert_resized_as_pil(pixels, full)


@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_a_prepared_batch_holds_one_decoded_photo_at_a_time(photos, monkeypatch, kind, jpeg_decoder):
    # Pillow's own count of its pixel blocks, read as each photo is resized: each decoded photo is freed once its
    # crop is cut, so the worker's memory does not grow with the batch size.
    live = []
    resized = batches_module.resize_box

    def spy(*args):
        stats = Image.core.get_stats()
        live.append(stats["allocated_blocks"] - stats["freed_blocks"])
        return resized(*args)

    monkeypatch.setattr(batches_module, "resize_box", spy)
    # At 160 px no JPEG is drafted: each result is torch's, no PIL image of its own (drafted ones are PIL's).
    first_batch(encoded_dataset(photos, kind), image_size=160, crop_scale=(0.05, 1.0))
    assert len(live) == len(photos) and live == [live[0]] * len(photos)


def test_eval_batches_of_photos_match_the_vit_image_processor(photos):
    # The whole photo resized to the model's size, whatever its size: PNG within a level of PIL (pil_resize),
    # drafted JPEG within its DCT scaling (a few levels at most; 20 allowed at 64 px here).
    ours = DeviceTransform(64, train=False)(first_batch(encoded_dataset(photos), image_size=64)["pixels"])
    expected = vit_processor(64)(photos, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, expected, atol=PIL_ROUNDING, rtol=0)
    big = [photo.resize((2 * photo.width, 2 * photo.height), Image.BICUBIC) for photo in photos]
    jpegs = encoded_dataset(big, "JPEG", quality=95)
    ours = DeviceTransform(64, train=False)(first_batch(jpegs, image_size=64)["pixels"])
    expected = vit_processor(64)(decoded(jpegs), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, expected, atol=20 / 127.5, rtol=0)
    assert (ours - expected).abs().mean() < 1 / 127.5


def test_small_images_of_one_size_keep_the_device_path(cifar):
    # CIFAR: 32 px, no larger than the model's 224, all one size: the batch leaves the workers as decoded.
    batch = first_batch(cifar.eval.select(range(8)), "img", image_size=224, crop_scale=(0.05, 1.0), hflip=True)
    assert not batch["prepared"] and batch["pixels"].shape == (8, 3, 32, 32)


def test_a_prepared_batch_is_only_scaled_on_the_device():
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    transform = DeviceTransform(32, train=True)
    assert torch.equal(transform(pixels, torch.Generator().manual_seed(0), prepared=True), pixels.float() / 127.5 - 1)
    assert torch.equal(
        transform.geometry(pixels, torch.Generator().manual_seed(0), prepared=True), pixels.float() / 255
    )
    # Eval of an image already at the model's size: the resize is the identity.
    assert torch.equal(DeviceTransform(32, train=False)(pixels), pixels.float() / 127.5 - 1)


# ---------------------------------------------------------------------------------------------------------------------
# Device transforms


def vit_processor(size: int) -> ViTImageProcessorPil:
    return ViTImageProcessorPil(
        size={"height": size, "width": size},
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def test_eval_transform_matches_the_vit_image_processor_upsampling_cifar(cifar):
    batch = first_batch(cifar.eval.select(range(8)), "img")
    ours = DeviceTransform(224, train=False)(batch["pixels"])
    images = [Image.fromarray(pixels.permute(1, 2, 0).numpy()) for pixels in batch["pixels"]]
    expected = vit_processor(224)(images, return_tensors="pt")["pixel_values"]
    assert ours.dtype == torch.float32 and ours.shape == expected.shape == (8, 3, 224, 224)
    torch.testing.assert_close(ours, expected, atol=PIL_ROUNDING, rtol=0)
    assert abs((ours - expected).mean()) < 0.02 / 127.5  # rounding only, no systematic offset


def test_eval_transform_matches_the_vit_image_processor_downsampling(cifar):
    # A real image, enlarged to 300x200 (width x height), then resized to 224: a downsample in width (antialiased).
    image = Image.fromarray(first_batch(cifar.eval.select([0]), "img")["pixels"][0].permute(1, 2, 0).numpy())
    image = image.resize((300, 200), Image.BICUBIC)
    ours = DeviceTransform(224, train=False)(chw(image)[None])
    expected = vit_processor(224)(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, expected, atol=PIL_ROUNDING, rtol=0)
    assert abs((ours - expected).mean()) < 0.02 / 127.5


def test_train_crops_are_cut_out_then_resized_as_pil_does():
    images = [random_image(48, 40, seed) for seed in range(6)]
    pixels = torch.stack([chw(image) for image in images])
    # The transform draws its crop boxes first, with random_crop_boxes: the same seed gives the same boxes.
    boxes = random_crop_boxes(6, 40, 48, (0.05, 1.0), torch.Generator().manual_seed(7)).int().tolist()
    ours = DeviceTransform(32, train=True, hflip=False).geometry(pixels, torch.Generator().manual_seed(7))
    for image, (top, left, height, width), result in zip(images, boxes, ours, strict=True):
        crop = image.crop((left, top, left + width, top + height)).resize((32, 32), Image.BILINEAR)
        torch.testing.assert_close(result, chw(crop).float() / 255, atol=1 / 255 + 1e-6, rtol=0)


def test_train_with_the_whole_image_and_no_flip_equals_eval(cifar):
    pixels = first_batch(cifar.eval.select(range(16)), "img")["pixels"]
    evaluated = DeviceTransform(64, train=False)(pixels)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(DeviceTransform(64, train=True, crop_scale=(1, 1), hflip=False)(pixels, generator), evaluated)
    assert torch.equal(DeviceTransform(64, train=True, crop_scale=None, hflip=False)(pixels, generator), evaluated)


def test_flip_mirrors_about_half_of_the_images(cifar):
    pixels = first_batch(cifar.eval.select(range(64)), "img")["pixels"]
    transform = DeviceTransform(48, train=True, crop_scale=None, hflip=True)
    flipped = transform(pixels, torch.Generator().manual_seed(0))
    evaluated = DeviceTransform(48, train=False)(pixels)
    mirrored = DeviceTransform(48, train=False)(pixels.flip(dims=[3]))
    same = [torch.equal(a, b) for a, b in zip(flipped, evaluated, strict=True)]
    mirror = [torch.allclose(a, b, atol=1e-5) for a, b in zip(flipped, mirrored, strict=True)]
    assert all(s != m for s, m in zip(same, mirror, strict=True))  # each image is one or the other
    assert 16 < sum(mirror) < 48


def test_train_transform_is_deterministic_under_a_seed():
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    transform = DeviceTransform(40, train=True)
    first = transform(pixels, torch.Generator().manual_seed(1))
    assert torch.equal(first, transform(pixels, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, transform(pixels, torch.Generator().manual_seed(2)))
    assert first.shape == (8, 3, 40, 40) and first.min() >= -1 and first.max() <= 1


def test_crop_boxes_fit_the_image_with_the_asked_area_and_aspect_ratio():
    height, width = 300, 300
    boxes = random_crop_boxes(20_000, height, width, (0.05, 1.0), torch.Generator().manual_seed(0))
    top, left, box_height, box_width = boxes.T
    assert torch.equal(boxes, boxes.round())
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + box_height <= height).all() and (left + box_width <= width).all()
    area = box_height * box_width / (height * width)
    aspect = box_width / box_height
    # Sides are rounded to whole pixels: allow half a pixel on each.
    assert area.min() > 0.05 * (1 - 1 / 20) ** 2 and area.max() <= 1
    assert aspect.min() > 3 / 4 * (1 - 1 / 40) and aspect.max() < 4 / 3 * (1 + 1 / 40)
    assert area.min() < 0.06 and area.max() > 0.95
    assert abs(aspect.log().mean()) < 0.01  # log-uniform: symmetric about 1
    assert (top + box_height / 2).mean() == pytest.approx(height / 2, rel=0.02)


def test_crop_boxes_fall_back_to_the_central_crop():
    # A 10x200 strip with at least 90% of its area always needs an aspect ratio far beyond 4/3: no attempt fits.
    boxes = random_crop_boxes(5, 10, 200, (0.9, 1.0), torch.Generator().manual_seed(0))
    width = round(10 * 4 / 3)
    assert boxes.tolist() == [[0, (200 - width) // 2, 10, width]] * 5


def test_to_model_range_maps_to_minus_one_one():
    assert to_model_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1, 1]
    assert to_model_range(torch.tensor([0.0, 0.5, 1.0])).tolist() == [-1, 0, 1]
    assert math.isclose(to_model_range(torch.tensor([51], dtype=torch.uint8)).item(), 51 / 127.5 - 1, rel_tol=1e-6)
