"""The inference CLI: batched top-k predictions as JSON lines, checked against the official model's logits."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from launch import run_in_process
from photos import png_declaring
from PIL import Image

from vit_hf.models.conversion import load_npz
from vit_hf.predict import main
from vit_hf.publish.model_dir import save_model_dir

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _predict(capsys, *args) -> tuple[int, list[dict], str]:
    """Run the CLI in-process: exit code, the JSON lines it printed, and its stderr."""
    code, out, err = run_in_process(main, args, capsys)
    return code, [json.loads(line) for line in out.splitlines()], err


@pytest.fixture(scope="module")
def model_dir(jax_reference_dir, tmp_path_factory):
    """The tiny official checkpoint with its own (random, non-zero) head, named for the CIFAR-10 classes."""
    model, _ = load_npz(jax_reference_dir / "tiny_token.npz", keep_head=True)
    model.config.id2label = dict(enumerate(CIFAR10_CLASSES))
    model.config.label2id = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    return save_model_dir(model, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def cifar_jpegs(cifar10_dir, tmp_path_factory):
    """Six real CIFAR-10 test images, as the JPEG files the parquet holds."""
    folder = tmp_path_factory.mktemp("cifar")
    rows = pq.read_table(cifar10_dir / "test.parquet").slice(0, 6).to_pylist()
    for i, row in enumerate(rows):
        (folder / f"{i}_{CIFAR10_CLASSES[row['label']]}.jpg").write_bytes(row["img"]["bytes"])
    return folder


def test_scores_are_the_softmax_of_the_official_logits(capsys, model_dir, jax_reference_dir, tmp_path):
    expected = np.load(jax_reference_dir / "tiny_token.expected.npz")
    for i, pixels in enumerate(expected["pixels_uint8_nhwc"]):
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")  # lossless, and 32 px: what the official model saw
    logits = expected["logits"].astype(np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)

    code, lines, _ = _predict(capsys, model_dir, tmp_path, "--top-k", "3", "--batch-size", "3")  # 3 + 3 + 2

    assert code == 0
    assert [line["image"] for line in lines] == [str(tmp_path / f"{i}.png") for i in range(8)]
    for line, row in zip(lines, probabilities, strict=True):
        best = np.argsort(-row)[:3]
        assert [p["label"] for p in line["predictions"]] == [CIFAR10_CLASSES[i] for i in best]
        np.testing.assert_allclose([p["score"] for p in line["predictions"]], row[best], atol=1e-5)


def test_folders_are_walked_recursively_in_sorted_order_and_files_kept_as_given(
    capsys, model_dir, cifar_jpegs, tmp_path
):
    nested = tmp_path / "b" / "nested"
    nested.mkdir(parents=True)
    (tmp_path / "b" / "2.jpg").write_bytes((cifar_jpegs / "2_horse.jpg").read_bytes())
    (nested / "1.jpg").write_bytes((cifar_jpegs / "1_cat.jpg").read_bytes())
    (tmp_path / "b" / "notes.txt").write_text("not an image, and not an image's name: skipped")

    code, lines, _ = _predict(capsys, model_dir, cifar_jpegs / "5_horse.jpg", tmp_path / "b")

    assert code == 0
    assert [line["image"] for line in lines] == [
        str(cifar_jpegs / "5_horse.jpg"),
        str(tmp_path / "b" / "2.jpg"),
        str(nested / "1.jpg"),
    ]


def test_real_cifar_jpegs_get_top_five_distinct_labels_best_first(capsys, model_dir, cifar_jpegs):
    code, lines, _ = _predict(capsys, model_dir, cifar_jpegs)

    assert code == 0 and len(lines) == 6
    for line in lines:
        scores = [p["score"] for p in line["predictions"]]
        assert len({p["label"] for p in line["predictions"]}) == 5
        assert {p["label"] for p in line["predictions"]} <= set(CIFAR10_CLASSES)
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("undecodable", "not a readable image file"),
        ("huge", "exceeds limit of"),  # a header that declares 200M pixels: Pillow's decompression bomb guard
        ("missing", "no such file or folder"),
        ("empty folder", "no image files in this folder"),
    ],
)
def test_bad_image_input_is_a_one_line_error_naming_it(capsys, model_dir, tmp_path, kind, message):
    path = tmp_path / "input.jpg"
    if kind == "undecodable":
        path.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    elif kind == "empty folder":
        path.mkdir()
    elif kind == "huge":
        path.write_bytes(png_declaring(20000, 10000))

    code, lines, err = _predict(capsys, model_dir, path)

    assert code == 2 and lines == []
    assert err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1, err


def test_a_folder_that_is_not_a_model_is_a_one_line_error(capsys, cifar_jpegs, tmp_path):
    code, _, err = _predict(capsys, tmp_path, cifar_jpegs)

    assert code == 2
    assert (
        err == f"error: {tmp_path}: not a model folder (no config.json, preprocessor_config.json, model.safetensors)\n"
    )


@pytest.fixture(scope="module")
def onnx_dir(model_dir, cifar_jpegs, tmp_path_factory):
    """model_dir exported by `python -m vit_hf.onnx`, checked on the real CIFAR-10 JPEGs."""
    from vit_hf.onnx import main as export

    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    export([str(model_dir), str(out), "--images", str(cifar_jpegs)])
    return out


@pytest.mark.slow
def test_an_onnx_folder_gives_the_lines_of_its_pytorch_folder(capsys, model_dir, onnx_dir, cifar_jpegs):
    code, torch_lines, _ = _predict(capsys, model_dir, cifar_jpegs, "--top-k", "3", "--batch-size", "4")
    onnx_code, onnx_lines, err = _predict(capsys, onnx_dir, cifar_jpegs, "--top-k", "3", "--batch-size", "4")

    assert code == onnx_code == 0 and err == ""
    assert len(onnx_lines) == 6
    for torch_line, onnx_line in zip(torch_lines, onnx_lines, strict=True):
        assert onnx_line.keys() == torch_line.keys() == {"image", "predictions"}
        assert onnx_line["image"] == torch_line["image"]
        assert [p["label"] for p in onnx_line["predictions"]] == [p["label"] for p in torch_line["predictions"]]
        np.testing.assert_allclose(
            [p["score"] for p in onnx_line["predictions"]], [p["score"] for p in torch_line["predictions"]], atol=1e-5
        )


@pytest.mark.slow
def test_an_onnx_file_that_does_not_match_its_config_is_one_line(capsys, onnx_dir, cifar_jpegs, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(onnx_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"image_size": 64}))

    code, lines, err = _predict(capsys, folder, cifar_jpegs)

    assert code == 2 and lines == []
    assert err == f"error: {folder}/model.onnx: takes 3x32x32 images, but config.json has image_size 64 (3x64x64)\n"


def test_skip_bad_reports_a_broken_file_on_its_line_and_goes_on(capsys, model_dir, cifar_jpegs, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    first, second = sorted(cifar_jpegs.glob("*.jpg"))[:2]

    code, lines, err = _predict(capsys, model_dir, first, broken, second, "--skip-bad", "--top-k", "2")

    assert code == 0 and err == ""
    assert [line["image"] for line in lines] == [str(first), str(broken), str(second)]
    assert lines[1] == {"image": str(broken), "error": "not a readable image file"}
    assert len(lines[0]["predictions"]) == len(lines[2]["predictions"]) == 2
