"""bad_images "skip" in training: a micro-batch whose images are all broken weighs nothing, and an update's gradient is
the mean over the images its window really holds, on one process or several."""

import io
import json

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from launch import run_module
from PIL import Image
from runs import TINY_VIT, assert_same_weights, losses, run_here, tiny_recipe, weights, write_recipe
from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification

from vit_hf.publish.model_dir import save_model_dir

GOOD = {"a": 3, "b": 2}  # PNGs of real CIFAR-10 images in each class folder
BROKEN = {"a": 2, "b": 1}  # files that are no image
LR = 0.1


@pytest.fixture(scope="module")
def folder(cifar10_dir, tmp_path_factory):
    """An image folder of 8 files, 3 of them broken, and the model a run starts from (its classes: the folders)."""
    root = tmp_path_factory.mktemp("skipped")
    rows = iter(pq.read_table(cifar10_dir / "train.parquet").slice(0, 5).to_pylist())
    for name in GOOD:
        (root / "images" / "train" / name).mkdir(parents=True)
        for i in range(GOOD[name]):
            Image.open(io.BytesIO(next(rows)["img"]["bytes"])).save(root / "images" / "train" / name / f"{i}.png")
        for i in range(BROKEN[name]):
            (root / "images" / "train" / name / f"broken{i}.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    labels = {"id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}}
    save_model_dir(
        ViTForImageClassification(ViTConfig(image_size=32, num_labels=2, **TINY_VIT, **labels)), root / "start"
    )
    return root


def skipping_recipe(cifar10_dir, root, out) -> dict:
    """One SGD update of 8 rows in micro-batches of 1 image: 3 of the 8 micro-batches are empty."""
    dataset = {"path": "imagefolder", "data_dir": str(root / "images"), "cache_dir": str(root / "cache")}
    return tiny_recipe(
        cifar10_dir,
        out,
        model={"pretrained": str(root / "start"), "image_size": 32, "config": {}},
        data={"dataset": dataset, "train_split": "train", "eval_split": None, "test_split": None, "bad_images": "skip"},
        optim={"name": "sgd", "lr": LR, "momentum": 0.9, "max_grad_norm": None},
        schedule={"name": "cosine", "warmup_steps": 0, "total_steps": 1},
        train={"global_batch_size": 8, "micro_batch_size": 1, "log_every": 1, "report_to": []},
    )


def reference(root) -> tuple[dict, float]:
    """The weights after one SGD step (lr at full rate, momentum's first step is the gradient) on the mean loss of
    the 5 good images, preprocessed by transformers' own image processor; and that loss."""
    model = ViTForImageClassification.from_pretrained(root / "start")
    processor = AutoImageProcessor.from_pretrained(root / "start")
    good = [
        (path, label)
        for label, name in enumerate(GOOD)
        for path in (root / "images" / "train" / name).glob("[0-9].png")
    ]
    pixels = processor([Image.open(path).convert("RGB") for path, _ in good], return_tensors="pt")["pixel_values"]
    loss = F.cross_entropy(model(pixel_values=pixels).logits, torch.tensor([label for _, label in good]))
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            param -= LR * param.grad
    return model.state_dict(), loss.item()


@pytest.mark.slow
def test_an_empty_micro_batch_weighs_nothing_and_the_update_is_the_mean_over_the_images_read(
    folder, cifar10_dir, tmp_path
):
    expected, expected_loss = reference(folder)

    one = tmp_path / "one"
    results = run_here(skipping_recipe(cifar10_dir, folder, one))
    assert results["skipped_images"] == 3 and results["step"] == 1
    assert losses(one) == pytest.approx([expected_loss], abs=1e-6)
    assert_same_weights(weights(one / "checkpoints" / "step_1"), expected, 1e-6)

    # Two processes: 4 micro-batches each, holding 5 images between them unevenly.
    two = tmp_path / "two"
    result = run_module("vit_hf.finetune", [str(write_recipe(tmp_path, skipping_recipe(cifar10_dir, folder, two)))], 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two / "results.json").read_text())["skipped_images"] == 3
    assert losses(two) == pytest.approx([expected_loss], abs=1e-6)
    assert_same_weights(weights(two / "checkpoints" / "step_1"), expected, 1e-6)
