"""Every shipped recipe runs on the CPU as written, shrunk only in size (torchtune's "a test validates every shipped
config", done as a run): the tiny official-layout checkpoint for ViT-B/16 (a tiny config for the from-scratch
recipes), a few hundred rows of the shared CIFAR-10, a few updates of a small global batch in the recipe's own
accumulation, and everything else as written: precision (bf16 autocast on the CPU), optimizer and momentum dtype,
schedule, augmentations, EMA, LoRA, drop path, layer decay. Each runs to the end: results.json, the exported folder,
`pipeline()` on it, the card, and the learning rate logged."""

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from runs import CIFAR10_CLASSES, train_rows, weights
from transformers import pipeline

from vit_hf.recipe import load_recipe
from vit_hf.training.loop import run
from vit_hf.training.optim import vit_jax_lr_factor

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.json"))
UPDATES, GLOBAL_BATCH = 4, 16
TINY_SCRATCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def shrunk(path: Path, cifar10_dir: Path, checkpoint: Path, out: Path) -> list[str]:
    """The `--set`s that shrink the recipe at PATH: model, data, steps and batch; the rest stays as written."""
    recipe = load_recipe(path)
    model, train = recipe["model"], recipe["train"]
    sets = {"output.dir": str(out), "data.num_workers": 0}
    if model["pretrained"] is None:  # a tiny ViT of the recipe's patch, at the recipe's size
        sets["model.config"] = TINY_SCRATCH | {"patch_size": model["config"].get("patch_size", 16)}
    else:  # the tiny checkpoint's 32 px (patch 4) where the recipe has ViT-B/16's 224, resampled as the recipe is
        sets["model.pretrained"] = str(checkpoint)
        sets["model.image_size"] = max(16, round(model["image_size"] / 224 * 8) * 4)
    files = {split: str(cifar10_dir / f"{split}.parquet") for split in ("train", "test")}
    sets |= {"data.dataset": {"path": "parquet", "data_files": files}, "data.train_split": "train[:128]"}
    sets |= {"data.eval_split": "train[128:192]", "data.test_split": recipe["data"]["test_split"] and "test[:64]"}
    sets["schedule.total_steps"] = UPDATES
    warmup = recipe["schedule"]["warmup_steps"] * UPDATES / recipe["schedule"]["total_steps"]
    sets["schedule.warmup_steps"] = min(max(1, round(warmup)), UPDATES - 1) if warmup else 0
    sets["train.global_batch_size"] = GLOBAL_BATCH
    if train["micro_batch_size"] != "auto":  # the recipe's accumulation
        sets["train.micro_batch_size"] = GLOBAL_BATCH * train["micro_batch_size"] // train["global_batch_size"]
    sets |= {"train.eval_batch_size": 32, "train.eval_every": 2, "train.save_every": 2, "train.log_every": 1}
    return [f"{key}={json.dumps(value)}" for key, value in sets.items()]


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_the_shipped_recipe_runs_as_written_shrunk_in_size(path, cifar10_dir, jax_reference_dir, tmp_path):
    written = load_recipe(path)
    out = tmp_path / "out"
    recipe = load_recipe(path, shrunk(path, cifar10_dir, jax_reference_dir / "tiny_token.npz", out))
    for section in ("optim", "hub"):
        assert recipe[section] == written[section]
    for key in ("augment", "bad_images", "split_order", "examples_per_class"):
        assert recipe["data"][key] == written["data"][key]
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        results = run(recipe)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["step"] == UPDATES and results["images_seen"] == UPDATES * GLOBAL_BATCH
    assert (results["mixed_precision"], results["compiled"]) == (written["train"]["mixed_precision"], False)
    assert results["eval_samples"] == 64 and results["test_samples"] == (64 if written["data"]["test_split"] else 0)
    assert results["accumulation_steps"] == GLOBAL_BATCH // recipe["train"]["micro_batch_size"]
    if written["model"]["lora"] is not None:
        assert results["trainable_parameters"] < results["total_parameters"] / 10
    assert_exported_model_serves_cifar(out, recipe["model"]["image_size"], cifar10_dir)
    assert_logged_lr_is_the_recipes_times_the_schedule(out, recipe)
    card = (out / "README.md").read_text()
    assert f"# {written['name']}" in card and f"mixed precision {written['train']['mixed_precision']}" in card
    assert "| train.parquet |" in card and str(tmp_path) not in card and str(cifar10_dir) not in card


def assert_exported_model_serves_cifar(out: Path, image_size: int, cifar10_dir: Path) -> None:
    """The exported folder: float32 weights (whatever precision trained them) that a pipeline loads and serves."""
    assert {tensor.dtype for tensor in weights(out).values()} == {torch.float32}
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == image_size and list(config["id2label"].values()) == CIFAR10_CLASSES
    classifier = pipeline("image-classification", model=str(out))
    row = pq.read_table(cifar10_dir / "test.parquet").slice(0, 1).to_pylist()[0]
    predictions = classifier(Image.open(io.BytesIO(row["img"]["bytes"])), top_k=3)
    assert len(predictions) == 3 and all(p["label"] in CIFAR10_CLASSES for p in predictions)


def assert_logged_lr_is_the_recipes_times_the_schedule(out: Path, recipe: dict) -> None:
    """Update s runs at the schedule of s - 1 updates done, the head's rate: optim.lr, whatever layer decay does to
    the lower layers."""
    rows, base = train_rows(out), recipe["optim"]["lr"]
    assert [row["step"] for row in rows] == list(range(1, UPDATES + 1))
    for row in rows:
        expected = base * vit_jax_lr_factor(row["step"] - 1, recipe["schedule"], base)
        assert row["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-12), row
