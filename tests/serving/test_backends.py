"""The serving backends and the fast batched reads: the saved image processor's pixels, the same answers from a
PyTorch and an ONNX folder, an ONNX file that does not match its config refused in one line, broken files."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoImageProcessor
from transformers.image_utils import load_image as transformers_load_image

from vit_hf.data.images import image_paths
from vit_hf.serving.backends import load_backend, load_served
from vit_hf.serving.classify import classify_paths
from vit_hf.serving.preprocess import Preprocessing
from vit_hf.utils.errors import UserError


@pytest.mark.parametrize("size", [32, 224])
def test_pixels_are_the_saved_processors_within_one_uint8_level(photos, model_dir, tmp_path, size):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["size"] = {"height": size, "width": size}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    paths = image_paths([photos])
    processor = AutoImageProcessor.from_pretrained(folder)
    expected = processor([transformers_load_image(str(p)) for p in paths], return_tensors="np")["pixel_values"]

    preprocessing = Preprocessing.from_folder(folder)
    pixels = preprocessing.pixel_values([preprocessing.read(p) for p in paths])

    assert pixels.shape == expected.shape == (len(paths), 3, size, size) and pixels.dtype == np.float32
    assert np.abs(pixels - expected).max() <= 2 / 255  # one uint8 level: the [-1, 1] range spans 255 levels


def test_a_pytorch_and_an_onnx_folder_give_the_same_predictions(model_dir, onnx_dir, cifar_jpegs):
    paths = image_paths([cifar_jpegs])
    answers = {}
    for folder in (model_dir, onnx_dir):
        backend = load_backend(folder)
        answers[backend.kind] = list(classify_paths(backend, Preprocessing.from_folder(folder), paths, 3, 5))

    assert [a["image"] for a in answers["onnx"]] == [str(p) for p in paths]
    for torch_line, onnx_line in zip(answers["pytorch"], answers["onnx"], strict=True):
        assert [p["label"] for p in torch_line["predictions"]] == [p["label"] for p in onnx_line["predictions"]]
        np.testing.assert_allclose(
            [p["score"] for p in torch_line["predictions"]], [p["score"] for p in onnx_line["predictions"]], atol=1e-5
        )


def test_an_onnx_folder_is_served_without_importing_torch(onnx_dir, cifar_jpegs):
    script = (
        "import sys; from vit_hf.serving.backends import load_backend; from vit_hf.serving.classify import "
        "classify_paths; from vit_hf.serving.preprocess import Preprocessing; from pathlib import Path; "
        f"folder = Path({str(onnx_dir)!r}); paths = sorted(Path({str(cifar_jpegs)!r}).glob('*.jpg')); "
        "lines = list(classify_paths(load_backend(folder), Preprocessing.from_folder(folder), paths)); "
        "print(len(lines), 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert done.stdout.split() == ["12", "False", "False"], done.stderr


def _edited_copy(onnx_dir, tmp_path, **fields):
    folder = tmp_path / "edited"
    shutil.copytree(onnx_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"id2label": {"0": "cat", "1": "dog"}}, "model.onnx: gives 10 classes, but config.json's id2label has 2"),
        ({"image_size": 64}, "model.onnx: takes 3x32x32 images, but config.json has image_size 64 (3x64x64)"),
    ],
)
def test_an_onnx_file_that_does_not_match_its_config_is_refused_when_loaded(onnx_dir, tmp_path, edit, message):
    folder = _edited_copy(onnx_dir, tmp_path, **edit)

    with pytest.raises(UserError) as error:
        load_backend(folder)

    assert str(error.value) == f"{folder / message}" and "\n" not in str(error.value)


@pytest.mark.parametrize("folder", ["pytorch", "onnx"])
def test_a_processor_of_another_size_than_the_model_is_refused(model_dir, onnx_dir, tmp_path, folder):
    edited = tmp_path / "edited"
    shutil.copytree(model_dir if folder == "pytorch" else onnx_dir, edited)
    config = json.loads((edited / "preprocessor_config.json").read_text())
    (edited / "preprocessor_config.json").write_text(json.dumps(config | {"size": {"height": 64, "width": 64}}))

    with pytest.raises(UserError) as error:
        load_served(edited)

    assert str(error.value) == f"{edited}/preprocessor_config.json: size 64x64, but config.json has image_size 32"


@pytest.mark.parametrize("kind", ["corrupt onnx", "both files", "no config"])
def test_a_broken_onnx_folder_is_refused_in_one_line(onnx_dir, model_dir, tmp_path, kind):
    folder = _edited_copy(onnx_dir, tmp_path)
    if kind == "corrupt onnx":
        (folder / "model.onnx").write_bytes(b"not a protobuf at all")
        expected = f"{folder / 'model.onnx'}: cannot be loaded by ONNX Runtime ("
    elif kind == "both files":
        shutil.copy(model_dir / "model.safetensors", folder)
        expected = f"{folder}: holds both model.safetensors and model.onnx; keep one"
    else:
        (folder / "config.json").unlink()
        expected = f"{folder}: not a model folder (no config.json)"

    with pytest.raises(UserError) as error:
        load_backend(folder)

    assert str(error.value).startswith(expected) and "\n" not in str(error.value), error.value


def test_a_broken_file_stops_the_run_or_with_skip_bad_gets_its_own_line(onnx_dir, cifar_jpegs, tmp_path):
    broken = tmp_path / "05_broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    paths = [*image_paths([cifar_jpegs])[:5], broken, *image_paths([cifar_jpegs])[5:8]]
    backend, preprocessing = load_backend(onnx_dir), Preprocessing.from_folder(onnx_dir)

    with pytest.raises(UserError, match=f"^{broken}: not a readable image file$"):
        list(classify_paths(backend, preprocessing, paths, batch_size=4))
    lines = list(classify_paths(backend, preprocessing, paths, batch_size=4, skip_bad=True))

    assert [line["image"] for line in lines] == [str(p) for p in paths]
    assert lines[5] == {"image": str(broken), "error": "not a readable image file"}
    assert all(len(line["predictions"]) == 5 for i, line in enumerate(lines) if i != 5)
