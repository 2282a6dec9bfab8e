"""vit_hf.validate: accuracy, top-5 and per-class accuracy checked against a plain torch run; two processes."""

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from launch import one_line_error, run_module
from PIL import Image
from transformers import ViTForImageClassification

from vit_hf.models.conversion import load_npz
from vit_hf.publish.model_dir import save_model_dir
from vit_hf.validate import main

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ROWS = 301  # divisible by neither 2 processes nor the batch size


def _save_with_labels(npz: Path, out: Path, labels: list[str]) -> Path:
    """The fixture with its own (noisy, non-trivial) head, its 10 classes named LABELS."""
    model, _ = load_npz(npz, keep_head=True)
    model.config.update({"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}})
    return save_model_dir(model, out)


@pytest.fixture(scope="module")
def model_dir(jax_reference_dir, tmp_path_factory) -> Path:
    return _save_with_labels(
        jax_reference_dir / "tiny_token.npz", tmp_path_factory.mktemp("model") / "m", CIFAR10_CLASSES
    )


def _dataset(cifar10_dir: Path) -> dict:
    files = {"train": str(cifar10_dir / "train.parquet"), "test": str(cifar10_dir / "test.parquet")}
    return {"path": "parquet", "data_files": files}


def _args(model: Path, cifar10_dir: Path, out: Path) -> list[str]:
    # The independent figures are of the first ROWS stored rows: the split in stored order, not shuffled.
    return [str(model), "--dataset", json.dumps(_dataset(cifar10_dir)), "--split", f"test[:{ROWS}]",
            "--set", "data.split_order=stored", "--batch-size", "64", "--num-workers", "0",
            "--out", str(out)]  # fmt: skip


def _validate(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    return run_module("vit_hf.validate", args, processes=processes, timeout=300)


@pytest.fixture(scope="module")
def expected(model_dir, cifar10_dir) -> dict:
    """The figures computed independently: the parquet's PNGs decoded with PIL, pixels / 127.5 - 1, plain torch."""
    table = pq.read_table(cifar10_dir / "test.parquet").slice(0, ROWS).to_pylist()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB")) for row in table])
    labels = np.array([row["label"] for row in table])
    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    assert model.config.image_size == pixels.shape[1] == 32  # so no resize: the plain formula is the whole transform
    with torch.no_grad():
        logits = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1).logits
    top5 = logits.topk(5, dim=-1).indices.numpy()
    predictions = top5[:, 0]
    per_class = {
        name: {"accuracy": float(np.mean(predictions[labels == i] == i)), "samples": int(np.sum(labels == i))}
        for i, name in enumerate(CIFAR10_CLASSES)
    }
    return {
        "accuracy": float(np.mean(predictions == labels)),
        "top5_accuracy": float(np.mean((top5 == labels[:, None]).any(axis=1))),
        "loss": float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))),
        "per_class": per_class,
    }


@pytest.fixture(scope="module")
def one_process(model_dir, cifar10_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("one") / "report"
    return _validate(_args(model_dir, cifar10_dir, out)), out


def test_figures_match_an_independent_computation(one_process, expected, model_dir, cifar10_dir):
    result, out = one_process
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "validate.json").read_text())
    assert report["samples"] == ROWS
    # The same images, the same model, the same formula: not a single prediction may differ.
    assert report["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert report["top5_accuracy"] == pytest.approx(expected["top5_accuracy"], abs=1e-12)
    assert report["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert list(report["per_class"]) == CIFAR10_CLASSES
    for name, row in expected["per_class"].items():
        assert report["per_class"][name]["samples"] == row["samples"], name
        assert report["per_class"][name]["accuracy"] == pytest.approx(row["accuracy"], abs=1e-12), name
    assert sum(row["samples"] for row in report["per_class"].values()) == ROWS
    # A non-trivial model: neither the all-same prediction of a zero head nor a perfect one.
    assert 0.12 < report["accuracy"] < report["top5_accuracy"] < 1
    assert report["split"] == f"test[:{ROWS}]"
    assert report["dataset"] == _dataset(cifar10_dir)
    assert report["model"] == str(model_dir)


def test_prints_a_table_and_the_json_and_writes_a_png_atomically(one_process):
    result, out = one_process
    assert "top-5 accuracy" in result.stdout
    assert any(line.split()[:1] == ["truck"] for line in result.stdout.splitlines())
    printed = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert printed == json.loads((out / "validate.json").read_text())
    png = (out / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(out / "confusion_matrix.png") as image:
        image.verify()
    assert sorted(path.name for path in out.iterdir()) == ["confusion_matrix.png", "validate.json"]  # no temp files


@pytest.mark.slow
def test_two_processes_count_every_sample_once_and_agree(one_process, model_dir, cifar10_dir, tmp_path):
    single = json.loads((one_process[1] / "validate.json").read_text())
    out = tmp_path / "report"
    result = _validate(_args(model_dir, cifar10_dir, out), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "validate.json").read_text())
    assert report["num_processes"] == 2 and single["num_processes"] == 1
    assert report["samples"] == ROWS
    assert report["accuracy"] == single["accuracy"]
    assert report["top5_accuracy"] == single["top5_accuracy"]
    assert report["per_class"] == single["per_class"]
    assert report["loss"] == pytest.approx(single["loss"], abs=1e-6)
    assert result.stdout.count("top-5 accuracy") == 1  # printed by the main process only


@pytest.mark.slow
def test_a_streamed_split_on_two_processes_gives_the_independent_figures(expected, model_dir, cifar10_dir, tmp_path):
    # One parquet shard for 2 processes: each reads every other row, the shorter part padded (vit_hf.streaming).
    data = {"train_split": "train", "eval_split": None, "test_split": f"test[:{ROWS}]", "streaming": True}
    recipe = {"data": {"dataset": _dataset(cifar10_dir), **data}}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    args = [str(model_dir), "--recipe", str(tmp_path / "recipe.json"), "--batch-size", "64", "--num-workers", "2",
            "--out", str(tmp_path / "report")]  # fmt: skip
    result = _validate(args, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "validate.json").read_text())
    assert (report["samples"], report["num_processes"]) == (ROWS, 2)
    assert report["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert report["top5_accuracy"] == pytest.approx(expected["top5_accuracy"], abs=1e-12)
    assert report["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert {name: row["samples"] for name, row in report["per_class"].items()} == {
        name: row["samples"] for name, row in expected["per_class"].items()
    }


def test_recipe_names_the_data_set_and_its_splits(model_dir, cifar10_dir, tmp_path):
    recipe = {"data": {"dataset": _dataset(cifar10_dir), "test_split": f"test[:{ROWS}]", "num_workers": 0,
                       "split_order": "stored"}}  # fmt: skip
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps(recipe))
    main([str(model_dir), "--recipe", str(recipe_path), "--split", "test", "--set", "train.eval_batch_size=100",
          "--out", str(tmp_path / "report")])  # fmt: skip
    report = json.loads((tmp_path / "report" / "validate.json").read_text())
    assert report["split"] == f"test[:{ROWS}]" and report["samples"] == ROWS


def _error(argv: list[str], capsys) -> str:
    return one_line_error(main, argv, capsys)


def test_bad_inputs_are_one_line_errors(model_dir, cifar10_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert "no config.json" in _error(_args(tmp_path / "absent", cifar10_dir, out), capsys)
    args = _args(model_dir, cifar10_dir, out)
    assert "split 'bogus'" in _error([*args, "--split", "bogus"], capsys)
    bad_recipe = tmp_path / "bad.json"
    bad_recipe.write_text('{"data": {"datasett": "cifar10"}}')
    assert "data.datasett: unknown field" in _error([str(model_dir), "--recipe", str(bad_recipe)], capsys)
    assert "no such recipe file" in _error([str(model_dir), "--recipe", str(tmp_path / "none.json")], capsys)
    assert "--dataset: not a valid JSON" in _error([*args, "--dataset", "{path: parquet}"], capsys)
    assert not out.exists()


def test_class_names_must_match_the_data_set(jax_reference_dir, cifar10_dir, tmp_path, capsys):
    swapped = [*CIFAR10_CLASSES[:3], "dog", *CIFAR10_CLASSES[4:5], "cat", *CIFAR10_CLASSES[6:]]
    model = _save_with_labels(jax_reference_dir / "tiny_token.npz", tmp_path / "swapped", swapped)
    message = _error(_args(model, cifar10_dir, tmp_path / "report"), capsys)
    assert "airplane, automobile, bird, dog, deer, cat" in message
    assert "airplane, automobile, bird, cat, deer, dog" in message and "'cifar10'" in message


@pytest.fixture(scope="module")
def onnx_dir(model_dir, tmp_path_factory) -> Path:
    """model_dir exported by `python -m vit_hf.onnx` (fp32, checked on sample images)."""
    from vit_hf.onnx import main as export

    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    export([str(model_dir), str(out)])
    return out


@pytest.mark.slow
def test_an_onnx_folder_gives_the_report_of_its_pytorch_folder(one_process, onnx_dir, cifar10_dir, tmp_path):
    out = tmp_path / "report"
    result = _validate(_args(onnx_dir, cifar10_dir, out))

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "validate.json").read_text())
    single = json.loads((one_process[1] / "validate.json").read_text())
    assert report.keys() == single.keys()
    assert report["model"] == str(onnx_dir)
    for key in ("accuracy", "top5_accuracy", "samples", "per_class", "split", "dataset", "num_processes"):
        assert report[key] == single[key], key
    assert report["loss"] == pytest.approx(single["loss"], abs=1e-5)
    assert sorted(path.name for path in out.iterdir()) == ["confusion_matrix.png", "validate.json"]


@pytest.mark.slow
def test_an_onnx_file_that_does_not_match_its_config_is_one_line_error(onnx_dir, cifar10_dir, tmp_path, capsys):
    folder = tmp_path / "edited"
    shutil.copytree(onnx_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "cat", "1": "dog"}
    (folder / "config.json").write_text(json.dumps(config))

    message = _error(_args(folder, cifar10_dir, tmp_path / "report"), capsys)

    assert message == f"error: {folder}/model.onnx: gives 10 classes, but config.json's id2label has 2\n"
