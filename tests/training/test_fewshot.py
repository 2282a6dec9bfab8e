"""vit_hf.fewshot: big_vision's few-shot probe, checked against scipy on features computed here; two processes."""

import contextlib
import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.linalg
import torch
from launch import one_line_error, run_module
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification

from vit_hf.fewshot import main
from vit_hf.models.conversion import load_npz
from vit_hf.publish.model_dir import save_model_dir
from vit_hf.training.fewshot import check_shots, draw_shots
from vit_hf.utils.errors import UserError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_ROWS, TEST_ROWS = 500, 203  # the rarest class of the first 500 train rows (airplane) has 30
SHOTS, SEEDS, L2_REG = [1, 5, 25], 3, 2.0**10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A seeded random ViT at CIFAR's 32 px (so the eval resize is the identity): 32 features, 2 layers."""
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=10, id2label=dict(enumerate(CIFAR10_CLASSES)),
        label2id={name: i for i, name in enumerate(CIFAR10_CLASSES)},
    )  # fmt: skip
    return save_model_dir(ViTForImageClassification(config), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def recipe(cifar10_dir, tmp_path_factory) -> Path:
    files = {"train": str(cifar10_dir / "train.parquet"), "test": str(cifar10_dir / "test.parquet")}
    data = {"dataset": {"path": "parquet", "data_files": files}, "train_split": f"train[:{TRAIN_ROWS}]",
            "eval_split": None, "test_split": f"test[:{TEST_ROWS}]", "num_workers": 0,
            "split_order": "stored"}  # the independent reference reads the first rows  # fmt: skip
    path = tmp_path_factory.mktemp("recipe") / "fewshot.json"
    path.write_text(json.dumps({"data": data, "train": {"eval_batch_size": 64}}))
    return path


def _args(model_dir: Path, recipe: Path, out: Path, shots: str = "1,5,25") -> list[str]:
    return [str(model_dir), "--recipe", str(recipe), "--shots", shots, "--seeds", str(SEEDS), "--out", str(out)]


def _rows(parquet: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first COUNT images (decoded with PIL, uint8 HWC) and labels of a parquet file."""
    table = pq.read_table(parquet).slice(0, count).to_pylist()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB")) for row in table])
    return pixels, np.array([row["label"] for row in table])


def _pre_logits(model_dir: Path, pixels: np.ndarray) -> np.ndarray:
    """The classifier's input (captured by a hook) for images scaled to [-1, 1] by the plain formula."""
    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    captured = []
    model.classifier.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    with torch.no_grad():
        model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)
    return captured[0].numpy()


def _reference_accuracy(train_x, train_y, test_x, test_y, l2_reg: float) -> float:
    """Ridge regression as an ordinary least-squares problem: [X; sqrt(l2) I] W = [Y; 0], solved by scipy."""
    train_x, test_x = train_x.astype(np.float64), test_x.astype(np.float64)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-5
    x = np.hstack([(train_x - mean) / std, np.full((len(train_x), 1), 100.0)])
    y = np.where(train_y[:, None] == np.arange(10), 1.0, -1.0)
    stacked_x = np.vstack([x, np.sqrt(l2_reg) * np.eye(x.shape[1])])
    stacked_y = np.vstack([y, np.zeros((x.shape[1], 10))])
    weights = scipy.linalg.lstsq(stacked_x, stacked_y)[0]
    scores = np.hstack([(test_x - mean) / std, np.full((len(test_x), 1), 100.0)]) @ weights
    return float(np.mean(scores.argmax(axis=1) == test_y))


def _big_vision_draw(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """big_vision's draw: each class's rows permuted by default_rng(seed), class by class; the first SHOTS of each."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(10)])


@pytest.fixture(scope="module")
def one_process(model_dir, recipe, tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("one") / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(_args(model_dir, recipe, out))
    return json.loads((out / "fewshot.json").read_text()), printed.getvalue()


def test_accuracies_equal_an_independent_least_squares_solution(one_process, model_dir, cifar10_dir):
    report, _ = one_process
    train_pixels, train_labels = _rows(cifar10_dir / "train.parquet", TRAIN_ROWS)
    test_pixels, test_labels = _rows(cifar10_dir / "test.parquet", TEST_ROWS)
    train_features, test_features = _pre_logits(model_dir, train_pixels), _pre_logits(model_dir, test_pixels)
    assert train_features.shape == (TRAIN_ROWS, 32)  # 1 shot: 10 rows < 33 dims, 5 and 25 shots: more rows
    assert list(report["shots"]) == [str(k) for k in SHOTS]
    for k in SHOTS:
        expected = []
        for seed in range(SEEDS):
            rows = _big_vision_draw(train_labels, k, seed)
            expected.append(
                _reference_accuracy(train_features[rows], train_labels[rows], test_features, test_labels, L2_REG)
            )
        row = report["shots"][str(k)]
        assert row["accuracy"] == pytest.approx(expected, abs=1e-12), k
        assert row["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
        assert row["std"] == pytest.approx(np.std(expected), abs=1e-12)
        assert row["train_samples"] == 10 * k
    assert report["shots"]["25"]["mean"] > 0.15  # the random features carry some signal: above chance
    assert len(set(report["shots"]["1"]["accuracy"])) > 1  # the seeds draw different examples
    assert report["l2_reg"] == L2_REG and report["eval_samples"] == TEST_ROWS and report["classes"] == 10
    assert report["model"] == str(model_dir) and report["num_processes"] == 1
    assert report["eval_split"] == f"test[:{TEST_ROWS}]" and report["train_split"] == f"train[:{TRAIN_ROWS}]"


def test_an_official_checkpoint_is_probed_at_the_recipe_image_size(jax_reference_dir, recipe, cifar10_dir, tmp_path):
    npz = jax_reference_dir / "tiny_token.npz"  # a 32 px model with 64 features
    out = tmp_path / "report"
    main([str(npz), "--recipe", str(recipe), "--set", "model.image_size=32", "--shots", "5", "--seeds", "1",
          "--eval-split", "test[:50]", "--out", str(out)])  # fmt: skip
    report = json.loads((out / "fewshot.json").read_text())
    model, _ = load_npz(npz, keep_head=True)
    train_pixels, train_labels = _rows(cifar10_dir / "train.parquet", TRAIN_ROWS)
    test_pixels, test_labels = _rows(cifar10_dir / "test.parquet", 50)
    folder = save_model_dir(model, tmp_path / "converted")
    train_features, test_features = _pre_logits(folder, train_pixels), _pre_logits(folder, test_pixels)
    rows = _big_vision_draw(train_labels, 5, seed=0)
    expected = _reference_accuracy(train_features[rows], train_labels[rows], test_features, test_labels, L2_REG)
    assert report["shots"]["5"]["accuracy"] == pytest.approx([expected], abs=1e-12)
    assert report["eval_samples"] == 50 and report["image_size"] == 32 and report["model"] == str(npz)


def test_prints_a_table(one_process):
    report, printed = one_process
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("shots"))
    for offset, k in enumerate(SHOTS, start=1):
        cells = lines[header + offset].split()
        assert cells[:2] == [str(k), str(10 * k)]
        assert float(cells[2]) == pytest.approx(report["shots"][str(k)]["mean"], abs=5e-5)


def test_the_draw_is_class_balanced_reproducible_and_seeded(cifar10_dir):
    labels = pq.read_table(cifar10_dir / "train.parquet", columns=["label"])["label"].to_numpy()[:TRAIN_ROWS]
    draws = [draw_shots(labels, 10, SHOTS, seed) for seed in range(SEEDS)]
    for draw in draws:
        for k in SHOTS:
            rows = draw[k]
            assert len(set(rows)) == len(rows) == 10 * k
            assert np.array_equal(np.bincount(labels[rows], minlength=10), np.full(10, k))
    again = draw_shots(labels, 10, SHOTS, 0)
    assert all(np.array_equal(draws[0][k], again[k]) for k in SHOTS)  # reproducible
    assert all(set(draws[0][k]) <= set(draws[0][25]) for k in SHOTS)  # nested within a seed, as big_vision's
    for k in SHOTS:
        assert len({tuple(sorted(draw[k])) for draw in draws}) == SEEDS, k


def test_too_many_shots_for_the_rarest_class_are_refused(cifar10_dir):
    labels = pq.read_table(cifar10_dir / "train.parquet", columns=["label"])["label"].to_numpy()[:TRAIN_ROWS]
    fewest = int(np.bincount(labels).min())
    check_shots(labels, CIFAR10_CLASSES, [1, fewest], "train[:500]")
    with pytest.raises(UserError, match=f"--shots {fewest + 1}: class 'airplane' has only {fewest} examples"):
        check_shots(labels, CIFAR10_CLASSES, [1, fewest + 1], "train[:500]")


def _error(argv: list[str], capsys) -> str:
    return one_line_error(main, argv, capsys)


@pytest.mark.parametrize("shots", ["0,5", "1,x", "", "-1", "2.5"])
def test_bad_shots_are_one_line_errors(shots, model_dir, recipe, tmp_path, capsys):
    out = tmp_path / "report"
    assert "--shots: expected comma-separated positive integers" in _error(_args(model_dir, recipe, out, shots), capsys)
    assert not out.exists()


def test_bad_values_and_paths_are_one_line_errors(model_dir, recipe, tmp_path, capsys):
    out = tmp_path / "report"
    assert "class 'airplane' has only 30 examples" in _error(_args(model_dir, recipe, out, "1,31"), capsys)
    assert "not a model folder" in _error(_args(tmp_path / "absent", recipe, out), capsys)
    assert "missing.npz: no such file" in _error(_args(tmp_path / "missing.npz", recipe, out), capsys)
    assert "--seeds must be at least 1" in _error([*_args(model_dir, recipe, out)[:-2], "--seeds", "0"], capsys)
    assert "--l2-reg must be positive" in _error([*_args(model_dir, recipe, out), "--l2-reg", "0"], capsys)
    assert "data.eval_split is null" in _error([*_args(model_dir, recipe, out), "--eval-split", "eval"], capsys)
    assert not out.exists()


def test_an_undecodable_drawn_image_is_named_by_its_row_in_the_train_split(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_CLASSES)})
    files = {}
    for split in ("train", "test"):
        images = []
        for _ in range(10):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        if split == "train":
            images[7] = {"bytes": b"not an image", "path": None}
        files[split] = str(tmp_path / f"{split}.parquet")
        rows = datasets.Dataset.from_dict({"img": images, "label": list(range(10))}, features=features)
        rows.to_parquet(files[split])
    data = {"dataset": {"path": "parquet", "data_files": files}, "num_workers": 0, "train_split": "train"}
    (tmp_path / "recipe.json").write_text(json.dumps({"data": data}))
    datasets.load_dataset("parquet", data_files=files)  # prepared once here, so its progress bars are not counted
    capsys.readouterr()
    message = _error(_args(model_dir, tmp_path / "recipe.json", tmp_path / "report", "1"), capsys)
    assert "data.train_split 'train': the drawn image in row 7 cannot be decoded" in message
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_two_processes_give_the_same_accuracies(one_process, model_dir, recipe, tmp_path):
    single, _ = one_process
    out = tmp_path / "report"
    result = run_module("vit_hf.fewshot", _args(model_dir, recipe, out), processes=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "fewshot.json").read_text())
    assert report["num_processes"] == 2 and report["eval_samples"] == TEST_ROWS
    assert report["shots"] == single["shots"]
    assert result.stdout.count("wrote") == 1  # the main process alone writes and prints
