"""python -m vit_hf.onnx: the exported graph gives PyTorch's logits on real CIFAR-10 images, for any batch; int8
figures checked against an independent computation; a failed verification leaves no folder; bad input in one line."""

import json
import shutil

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, ViTForImageClassification

from serving.material import CIFAR10_CLASSES, EVAL_ROWS, export
from vit_hf.data.sources import load_splits
from vit_hf.serving import verify

pytestmark = pytest.mark.slow  # each export traces the model (seconds)


def _session(folder):
    return onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _pixels(model_dir, images) -> np.ndarray:
    """The saved image processor's input for IMAGES (transformers' own, not vit_hf's)."""
    return AutoImageProcessor.from_pretrained(model_dir)(images, return_tensors="np")["pixel_values"]


def _torch_logits(model_dir, pixels: np.ndarray) -> np.ndarray:
    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels)).logits.numpy()


@pytest.fixture(scope="module")
def cifar_images(recipe_path) -> tuple[list[Image.Image], np.ndarray]:
    """The recipe's eval split (real CIFAR-10 test rows) as the data layer cuts it, decoded by PIL."""
    data = json.loads(recipe_path.read_text())["data"]
    rows = load_splits({**data, "train_split": None, "test_split": None}).eval
    images = [image.convert("RGB") for image in rows["img"]]
    return images, np.array(rows["label"])


def test_folder_keeps_config_and_processor_and_says_what_it_is(onnx_dir, model_dir):
    assert {p.name for p in onnx_dir.iterdir()} == {
        "model.onnx", "config.json", "preprocessor_config.json", "onnx_export.json", "README.md"
    }  # fmt: skip
    for name in ("config.json", "preprocessor_config.json"):
        assert (onnx_dir / name).read_bytes() == (model_dir / name).read_bytes()
    report = json.loads((onnx_dir / "onnx_export.json").read_text())
    assert report["precision"] == "fp32" and report["source"] == model_dir.name
    assert report["fp32_check"]["inputs"] == "64 rows of cifar10 test[:100]"
    assert report["fp32_check"]["max_abs_logit_difference"] <= 1e-4
    assert "fp32 ONNX export" in (onnx_dir / "README.md").read_text()


def test_the_report_and_card_name_no_path_of_this_machine(model_dir, recipe_path, cifar10_dir, tmp_path):
    from vit_hf.onnx import main

    out = tmp_path / "onnx"
    local_folder = json.dumps({"path": str(cifar10_dir)})  # the data set by its folder, as the quickstart names it
    main([str(model_dir), str(out), "--recipe", str(recipe_path), "--set", f"data.dataset={local_folder}",
          "--split", "test[:64]"])  # fmt: skip
    report = json.loads((out / "onnx_export.json").read_text())
    assert report["source"] == model_dir.name
    assert report["fp32_check"]["inputs"] == f"64 rows of {cifar10_dir.name} test[:64]"
    for name in ("onnx_export.json", "README.md"):
        text = (out / name).read_text()
        assert str(cifar10_dir) not in text and str(model_dir) not in text and str(tmp_path) not in text


@pytest.mark.parametrize("batch", [1, 5])
def test_logits_match_pytorch_on_real_cifar_images_for_any_batch(onnx_dir, model_dir, cifar_images, batch):
    pixels = _pixels(model_dir, cifar_images[0][:batch])

    logits = _session(onnx_dir).run(["logits"], {"pixel_values": pixels})[0]

    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, _torch_logits(model_dir, pixels), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def int8_dir(model_dir, recipe_path, tmp_path_factory):
    from vit_hf.onnx import main

    out = tmp_path_factory.mktemp("exports") / "tiny-int8"
    main([str(model_dir), str(out), "--quantize", "int8", "--recipe", str(recipe_path)])
    return out


def test_int8_figures_on_the_eval_split_match_an_independent_computation(int8_dir, model_dir, cifar_images):
    images, labels = cifar_images
    pixels = _pixels(model_dir, images)  # 32 px: the processor's resize is the identity, as evaluation's
    fp32 = _torch_logits(model_dir, pixels).argmax(-1)
    # Batches of 32, the export's: dynamic quantization scales the activations by each batch's own range.
    session = _session(int8_dir)
    int8 = np.concatenate([session.run(["logits"], {"pixel_values": pixels[i : i + 32]})[0] for i in range(0, 100, 32)])
    int8 = int8.argmax(-1)

    figures = json.loads((int8_dir / "onnx_export.json").read_text())["int8"]

    assert figures["images"] == EVAL_ROWS and figures["inputs"] == f"{EVAL_ROWS} rows of cifar10 test[:{EVAL_ROWS}]"
    assert figures["top1_agreement"] == pytest.approx(np.mean(fp32 == int8))
    assert figures["accuracy_fp32"] == pytest.approx(np.mean(fp32 == labels))
    assert figures["accuracy_int8"] == pytest.approx(np.mean(int8 == labels))
    assert figures["accuracy_points_lost"] == pytest.approx(
        100 * np.mean(fp32 == labels) - 100 * np.mean(int8 == labels)
    )


def test_int8_card_states_what_was_lost(int8_dir):
    figures = json.loads((int8_dir / "onnx_export.json").read_text())["int8"]
    card = (int8_dir / "README.md").read_text()

    assert "## What int8 lost" in card
    assert f"fp32 {figures['accuracy_fp32']:.2%}, int8 {figures['accuracy_int8']:.2%}" in card
    assert f"{figures['top1_agreement']:.2%}" in card


def test_int8_without_a_recipe_is_verified_on_samples_and_says_accuracy_was_not_measured(model_dir, tmp_path, capsys):
    out = tmp_path / "int8"

    code, stdout, _ = export(capsys, model_dir, out, "--quantize", "int8")

    assert code == 0
    report = json.loads((out / "onnx_export.json").read_text())
    assert report["fp32_check"]["max_abs_logit_difference"] <= 1e-4
    assert report["int8"]["images"] == 64 and 0 <= report["int8"]["top1_agreement"] <= 1
    assert report["int8"]["accuracy_fp32"] is None and report["int8"]["accuracy_int8"] is None
    assert "accuracy was not measured" in stdout
    assert "Accuracy was not measured" in (out / "README.md").read_text()


def test_an_export_that_fails_verification_leaves_no_folder(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(verify, "FP32_TOLERANCE", 0.0)
    monkeypatch.setattr("vit_hf.serving.onnx_folder.FP32_TOLERANCE", 0.0)
    out = tmp_path / "exports" / "never"

    code, stdout, err = export(capsys, model_dir, out)

    assert code == 1 and stdout == ""
    assert err.startswith(f"error: {out}: not written: the ONNX export's logits differ") and err.count("\n") == 1, err
    assert list((tmp_path / "exports").iterdir()) == []  # no folder, no staging left beside it


def test_a_failed_export_keeps_the_folder_it_would_have_replaced(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vit_hf.serving.onnx_folder.FP32_TOLERANCE", 0.0)
    out = tmp_path / "export"
    out.mkdir()
    (out / "kept.txt").write_text("an earlier export")

    code, _, _ = export(capsys, model_dir, out)

    assert code == 1 and [p.name for p in tmp_path.iterdir()] == ["export"]
    assert (out / "kept.txt").read_text() == "an earlier export"


@pytest.mark.parametrize("kind", ["empty folder", "onnx folder", "same folder", "classes"])
def test_bad_input_is_one_line_naming_it(kind, model_dir, onnx_dir, recipe_path, tmp_path, capsys):
    source, out, extra = model_dir, tmp_path / "out", []
    if kind == "empty folder":
        source = tmp_path / "empty"
        source.mkdir()
        expected = f"error: {source}: not a model folder (no config.json, preprocessor_config.json, model.safetensors)"
    elif kind == "onnx folder":
        source, expected = onnx_dir, f"error: {onnx_dir}: already an ONNX folder"
    elif kind == "same folder":
        out, expected = model_dir, f"error: {model_dir}: the export needs its own folder"
    else:  # the model's classes in another order than the data set's: its accuracy there would mean nothing
        source = tmp_path / "reversed"
        shutil.copytree(model_dir, source)
        config = json.loads((source / "config.json").read_text())
        config["id2label"] = dict(enumerate(reversed(CIFAR10_CLASSES)))
        (source / "config.json").write_text(json.dumps(config))
        extra, expected = ["--recipe", recipe_path], f"error: the classes of model {source} (10: truck, ship"

    code, stdout, err = export(capsys, source, out, *extra)

    assert code == 2 and stdout == "" and err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
