"""Shared material of the serving tests: the tiny official checkpoint as a CIFAR-10 model folder, real CIFAR-10 test
images as JPEG files and photos, a recipe over the real CIFAR-10 parquet files, and exports made with the CLI.

tests/serving is a package, so that this conftest is imported as serving.conftest and leaves the name `conftest` to
tests/conftest.py (which test modules import by name)."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from serving.material import CIFAR10_CLASSES, EVAL_ROWS
from vit_hf.models.conversion import load_npz
from vit_hf.onnx import main as onnx_main
from vit_hf.publish.model_dir import save_model_dir


@pytest.fixture(scope="module")
def model_dir(jax_reference_dir, tmp_path_factory) -> Path:
    """The tiny official checkpoint (32 px, patch 4) with its own (random, non-zero) head, named for CIFAR-10."""
    model, _ = load_npz(jax_reference_dir / "tiny_token.npz", keep_head=True)
    model.config.update({"id2label": dict(enumerate(CIFAR10_CLASSES)),
                         "label2id": {name: i for i, name in enumerate(CIFAR10_CLASSES)}})  # fmt: skip
    return save_model_dir(model, tmp_path_factory.mktemp("model") / "tiny")


def cifar_rows(cifar10_dir: Path, count: int, start: int = 0) -> list[dict]:
    return pq.read_table(cifar10_dir / "test.parquet").slice(start, count).to_pylist()


@pytest.fixture(scope="module")
def cifar_jpegs(cifar10_dir, tmp_path_factory) -> Path:
    """Twelve real CIFAR-10 test images, as the JPEG files the parquet holds (32 px)."""
    folder = tmp_path_factory.mktemp("cifar")
    for i, row in enumerate(cifar_rows(cifar10_dir, 12)):
        (folder / f"{i:02d}_{CIFAR10_CLASSES[row['label']]}.jpg").write_bytes(row["img"]["bytes"])
    return folder


@pytest.fixture(scope="module")
def photos(cifar10_dir, tmp_path_factory) -> Path:
    """Ten real CIFAR-10 test images enlarged to photos of 40-300 px, JPEG and PNG, some grey or with a palette."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    kinds = [("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("P", "PNG"), ("RGBA", "PNG")]
    for i, row in enumerate(cifar_rows(cifar10_dir, 10, start=100)):
        mode, kind = kinds[i % len(kinds)]
        width, height = (int(side) for side in rng.integers(40, 301, 2))
        image = Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB").resize((width, height), Image.BICUBIC)
        image.convert(mode).save(folder / f"{i:02d}.{kind.lower()}", kind)
    return folder


@pytest.fixture(scope="module")
def recipe_path(cifar10_dir, tmp_path_factory) -> Path:
    """A recipe whose data section is the real CIFAR-10 parquet files, its eval split the first 100 test rows."""
    files = {"train": str(cifar10_dir / "train.parquet"), "test": str(cifar10_dir / "test.parquet")}
    recipe = {
        "name": "serving-test",
        "model": {"pretrained": None, "image_size": 32},
        "data": {"dataset": {"path": "parquet", "data_files": files}, "train_split": "train[:64]",
                 "eval_split": f"test[:{EVAL_ROWS}]", "test_split": "test[100:150]", "num_workers": 0},
        "output": {"dir": str(tmp_path_factory.mktemp("unused"))},
    }  # fmt: skip
    path = tmp_path_factory.mktemp("recipe") / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def onnx_dir(model_dir, recipe_path, tmp_path_factory) -> Path:
    """The fp32 export of model_dir, checked on real CIFAR-10 rows (the recipe's eval split)."""
    out = tmp_path_factory.mktemp("exports") / "tiny-onnx"
    onnx_main([str(model_dir), str(out), "--recipe", str(recipe_path)])
    return out
