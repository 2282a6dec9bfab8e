"""Folders of photos of any size, aspect ratio, mode and format: through the loop's CLI, on one and two processes.

The photos are real CIFAR-10 test images (read with pyarrow and PIL), enlarged and saved by PIL as an imagefolder.
"""

import io
import json
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from launch import run_module
from PIL import Image
from test_finetune import losses, tiny_recipe, write_recipe
from transformers import pipeline

CLASSES = {"cat": 3, "dog": 5, "ship": 8}  # folder name: CIFAR-10 label
# Each split's photos cycle through these (mode, format): the modes an image folder may hold.
KINDS = [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGB", "PNG"), ("L", "PNG")]
SPLIT_SIZES = {"train": 15, "validation": 7, "test": 5}
BROKEN = Path("train") / "dog" / "broken.jpg"


def cifar_images(cifar10_dir: Path, label: int, count: int) -> list[Image.Image]:
    """The first COUNT CIFAR-10 test images of one class."""
    rows = pq.read_table(cifar10_dir / "test.parquet").slice(0, 400).to_pylist()
    images = [Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB") for row in rows if row["label"] == label]
    return images[:count]


def write_photo_folder(root: Path, cifar10_dir: Path, broken: bool) -> Path:
    """An imagefolder (split/class/photo) of photos 24-160 px wide and high, of every kind in KINDS; with BROKEN, a
    file that is no image among the training photos (16 training rows either way, for 2 batches of 8 an epoch)."""
    rng = np.random.default_rng(0)
    pool = {name: cifar_images(cifar10_dir, label, sum(SPLIT_SIZES.values())) for name, label in CLASSES.items()}
    for split, size in SPLIT_SIZES.items():
        for i in range(size + (split == "train" and not broken)):
            name = list(CLASSES)[i % len(CLASSES)]
            mode, kind = KINDS[i % len(KINDS)]
            width, height = (int(side) for side in rng.integers(24, 161, 2))
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            photo = pool[name].pop().resize((width, height), Image.BICUBIC).convert(mode)
            photo.save(folder / f"{i:02d}.{kind.lower()}", kind)
    if broken:
        (root / BROKEN).write_bytes(b"not a JPEG")
    return root


@pytest.fixture(scope="module")
def photos(cifar10_dir, tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos"), cifar10_dir, broken=True)


@pytest.fixture(scope="module")
def clean_photos(cifar10_dir, tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("clean_photos"), cifar10_dir, broken=False)


def photo_recipe(cifar10_dir: Path, folder: Path, out: Path, **data) -> dict:
    """tiny_recipe's ViT and schedule on a photo folder: 4 updates of 8, i.e. 2 epochs of its 16 training rows."""
    source = {"path": "imagefolder", "data_dir": str(folder), "cache_dir": str(out.parent / "datasets_cache")}
    return tiny_recipe(
        cifar10_dir,
        out,
        data={
            "dataset": source, "train_split": "train", "eval_split": "validation", "test_split": "test",
            "augment": {"crop_scale": [0.3, 1.0], "hflip": True}, "bad_images": "skip", **data,
        },
        schedule={"name": "cosine", "warmup_steps": 1, "total_steps": 4},
        train={"global_batch_size": 8, "micro_batch_size": 8, "eval_batch_size": 3, "eval_every": 2, "log_every": 1},
    )  # fmt: skip


def finetune(tmp_path: Path, recipe: dict, processes: int = 1):
    return run_module("vit_hf.finetune", [str(write_recipe(tmp_path, recipe))], processes=processes)


@pytest.mark.slow
def test_a_folder_of_mixed_photos_trains_end_to_end_and_serves_its_folder_names(cifar10_dir, photos, tmp_path):
    out = tmp_path / "out"
    result = finetune(tmp_path, photo_recipe(cifar10_dir, photos, out))
    assert result.returncode == 0, result.stderr[-3000:]

    assert (out / "README.md").is_file() and (out / "training_curves.png").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["eval_samples"] == SPLIT_SIZES["validation"] and results["test_samples"] == SPLIT_SIZES["test"]
    assert results["skipped_images"] == 2  # the broken file, once in each of the 2 epochs
    assert results["class_names"] == list(CLASSES)
    classifier = pipeline("image-classification", model=str(out))
    predictions = classifier(Image.open(sorted((photos / "test" / "ship").iterdir())[0]).convert("RGB"), top_k=3)
    assert sorted(p["label"] for p in predictions) == sorted(CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_undecodable_photo_stops_the_run_with_one_line_naming_its_row(cifar10_dir, photos, tmp_path, num_workers):
    recipe = photo_recipe(cifar10_dir, photos, tmp_path / "out", bad_images="stop", num_workers=num_workers)
    result = finetune(tmp_path, recipe)

    assert result.returncode == 2
    # The row of the broken file, as datasets itself lists the folder.
    files = datasets.load_dataset("imagefolder", data_dir=str(photos), split="train", cache_dir=str(tmp_path / "c"))
    paths = [Path(image["path"]) for image in files.cast_column("image", datasets.Image(decode=False))["image"]]
    row = paths.index(photos / BROKEN)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    pattern = rf"error: undecodable image in row {row}, column 'image': .+ \(bad_images: \"skip\" drops such rows\)"
    assert re.fullmatch(pattern, errors[0]), errors[0]


@pytest.mark.slow
def test_two_processes_crop_the_photos_as_one_does(cifar10_dir, clean_photos, tmp_path):
    # The crops and flips are drawn in the workers from (seed, epoch, row): whichever process reads a row, it gets
    # the same pixels, so 2 processes x 4 photos give the loss trace of 1 process x 8.
    one, two = tmp_path / "one", tmp_path / "two"
    result = finetune(tmp_path, photo_recipe(cifar10_dir, clean_photos, one, num_workers=1))
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = photo_recipe(cifar10_dir, clean_photos, two, num_workers=1)
    recipe["train"]["micro_batch_size"] = 4
    result = finetune(tmp_path, recipe, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two / "results.json").read_text())["num_processes"] == 2
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
