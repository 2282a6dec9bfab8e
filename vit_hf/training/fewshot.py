"""Few-shot linear probes on frozen features, as big_vision's `fewshot_lsr` (`python -m vit_hf.fewshot`).

Features: the pre-logits representation, i.e. the output of the encoder's final LayerNorm (`vit.layernorm`) at the
class token, `model.vit(pixels).last_hidden_state[:, 0]`, which is the classifier's input (the official checkpoints'
pre_logits layer is dropped on conversion). Images get the eval preprocessing: a resize to the model's size, [-1, 1].

For each seed s (0, 1, ...): the rows of each class of the train split are shuffled by numpy's
`default_rng(s).permutation`, class by class, and K-shot takes the first K of each (so a seed's draws are nested).
On those N = K x C examples, features X are standardised with their mean and std (+ 1e-5) and a constant feature 100
is appended (the bias, so large that it is barely regularised); targets Y are one-hot mapped to {-1, 1}. Then

    W = (X^T X + l2_reg I)^-1 X^T Y    (computed as X^T (X X^T + l2_reg I)^-1 Y when N < D + 1)

with l2_reg = 2**10 by default, and a test image is given the class of its largest score in its standardised,
padded features @ W. The solve runs in float64 on the main process; features are extracted on each process's shard
of the images and gathered, every image counted once. fewshot.json holds, for each K, each seed's accuracy, their
mean and standard deviation (numpy's, ddof 0) and the train sample count, and the eval sample count and l2_reg.
"""

import functools
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import ViTForImageClassification

from vit_hf.data.loader import make_loader
from vit_hf.data.sources import load_splits
from vit_hf.data.transforms import DeviceTransform
from vit_hf.models.build import is_official_checkpoint
from vit_hf.models.conversion import load_npz
from vit_hf.publish.model_dir import load_model_dir
from vit_hf.recipe import SPLIT_FIELDS
from vit_hf.training.accelerator import gloo_on_cpu
from vit_hf.training.evaluation import gather_rows
from vit_hf.utils.errors import UserError
from vit_hf.utils.files import write_json

DEFAULT_L2_REG = 2.0**10  # big_vision's configs/common_fewshot.py
BIAS_FEATURE = 100.0
STD_EPSILON = 1e-5


def draw_shots(labels: np.ndarray, num_classes: int, shots: list[int], seed: int) -> dict[int, np.ndarray]:
    """For each K of SHOTS, the row numbers of K examples of each class (class by class), big_vision's draw."""
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(np.flatnonzero(labels == label)) for label in range(num_classes)]
    return {k: np.concatenate([rows[:k] for rows in shuffled]) for k in shots}


def check_shots(labels: np.ndarray, class_names: list[str], shots: list[int], split: str) -> None:
    """Refuse more shots than the rarest class has examples."""
    counts = np.bincount(labels, minlength=len(class_names))
    rarest = int(np.argmin(counts))
    if max(shots) > counts[rarest]:
        raise UserError(
            f"--shots {max(shots)}: class {class_names[rarest]!r} has only {counts[rarest]} examples in the train "
            f"split {split!r}"
        )


def probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    l2_reg: float,
) -> float:
    """Accuracy on the test features of the regularised least-squares probe of the module's docstring."""
    train_features = train_features.astype(np.float64)
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0) + STD_EPSILON

    def design(features: np.ndarray) -> np.ndarray:
        standardised = (features.astype(np.float64) - mean) / std
        return np.hstack([standardised, np.full((len(features), 1), BIAS_FEATURE)])

    x = design(train_features)
    y = 2.0 * np.eye(num_classes)[train_labels] - 1.0
    samples, dims = x.shape
    # The same W either way; the smaller of the two systems is solved.
    if samples >= dims:
        weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(dims), x.T @ y)
    else:
        weights = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(samples), y)
    predictions = np.argmax(design(test_features) @ weights, axis=1)
    return float(np.mean(predictions == test_labels))


def extract_features(model: ViTForImageClassification, loader, accelerator: Accelerator) -> dict:
    """Row numbers, labels and pre-logits features (float32) of every image of LOADER, gathered, sorted by row."""
    transform = DeviceTransform(model.config.image_size, train=False)
    local = {"index": [], "labels": [], "features": []}
    with torch.inference_mode():
        for batch in loader:
            hidden = model.vit(pixel_values=transform(batch["pixels"])).last_hidden_state
            local["features"].append(hidden[:, 0].float())
            local["index"].append(batch["index"])
            local["labels"].append(batch["labels"])
    return gather_rows({key: torch.cat(values) for key, values in local.items()}, accelerator)


def load_probe_model(source: str, image_size: int, class_names: list[str]) -> ViTForImageClassification:
    """An official checkpoint (at the recipe's image size; its head is not used) or a model folder, as it is."""
    if is_official_checkpoint(source):
        model, _ = load_npz(source, image_size=image_size, labels=class_names)
        return model
    return load_model_dir(source)


def split_expression(recipe: dict, split: str) -> str:
    """train, eval and test name the recipe's splits; any other value is a split expression."""
    if split not in SPLIT_FIELDS:
        return split
    expression = recipe["data"][SPLIT_FIELDS[split]]
    if expression is None:
        raise UserError(f"--eval-split {split}: the recipe's data.{SPLIT_FIELDS[split]} is null")
    return expression


def fewshot(
    source: str,
    recipe: dict,
    shots: list[int],
    seeds: int,
    l2_reg: float = DEFAULT_L2_REG,
    eval_split: str = "test",
    batch_size: int = 128,
    num_workers: int = 0,
    out: Path = Path("."),
) -> dict:
    """The few-shot report of model SOURCE on the recipe's data set (its accuracies on the main process only, which
    prints it and writes OUT/fewshot.json)."""
    accelerator = Accelerator(cpu=gloo_on_cpu())
    data = recipe["data"]
    train_split, test_split = data["train_split"], split_expression(recipe, eval_split)
    with accelerator.main_process_first():
        splits = load_splits({**data, "eval_split": None, "test_split": test_split})
    num_classes = len(splits.class_names)
    labels = np.asarray(splits.train.with_format("arrow")[splits.label_column].to_numpy())
    check_shots(labels, splits.class_names, shots, train_split)
    draws = [draw_shots(labels, num_classes, shots, seed) for seed in range(seeds)]
    # Only the drawn examples are needed: at most max(shots) x classes x seeds images, not the whole train split.
    drawn_rows = np.unique(np.concatenate([rows for draw in draws for rows in draw.values()]))
    with accelerator.main_process_first():
        model = load_probe_model(source, recipe["model"]["image_size"], splits.class_names)
    model = model.to(accelerator.device).eval()
    reader = functools.partial(_features, model, splits, accelerator, batch_size, num_workers)
    train = _drawn_features(reader, splits.train, drawn_rows, train_split)
    test = reader(splits.test, data["bad_images"])
    report = {
        "model": source,
        "dataset": data["dataset"],
        "train_split": train_split,
        "eval_split": test_split,
        "image_size": model.config.image_size,
        "features": "pre-logits: the final LayerNorm's output at the class token",
        "l2_reg": l2_reg,
        "classes": num_classes,
        "eval_samples": len(test["index"]),
        "num_processes": accelerator.num_processes,
        "shots": {},
    }
    if accelerator.is_main_process:
        report["shots"] = _shot_accuracies(draws, drawn_rows, train, test, num_classes, l2_reg)
        path = write_json(out / "fewshot.json", report)
        print(format_table(report))
        print(f"wrote {path}")
    accelerator.wait_for_everyone()
    return report


def _features(model, splits, accelerator: Accelerator, batch_size: int, num_workers: int, dataset, bad_images: str):
    loader = make_loader(
        dataset, splits.image_column, splits.label_column, batch_size, shuffle=False,
        num_workers=num_workers, bad_images=bad_images, image_size=model.config.image_size,
    )  # fmt: skip
    return extract_features(model, accelerator.prepare(loader), accelerator)


def _drawn_features(reader, train_split, drawn_rows: np.ndarray, expression: str) -> dict:
    """The features of the drawn train rows; every one of them must decode."""
    # Skipped, not stopped at, so that an undecodable drawn image is reported by its row in the train split.
    train = reader(train_split.select(drawn_rows), "skip")
    if len(train["index"]) < len(drawn_rows):
        missing = drawn_rows[np.setdiff1d(np.arange(len(drawn_rows)), train["index"])]
        raise UserError(
            f"data.train_split {expression!r}: the drawn image in row {missing[0]} cannot be decoded "
            f"({len(missing)} such); the few-shot probe needs every drawn example"
        )
    return train


def _shot_accuracies(draws, drawn_rows: np.ndarray, train: dict, test: dict, num_classes: int, l2_reg: float):
    """For each shot count, the probe's accuracy on each seed's draw, their mean and std."""

    def accuracy(rows: np.ndarray) -> float:
        picked = np.searchsorted(drawn_rows, rows)  # drawn_rows is sorted: the positions of ROWS' features
        train_features, train_labels = train["features"][picked], train["labels"][picked]
        return probe_accuracy(train_features, train_labels, test["features"], test["labels"], num_classes, l2_reg)

    results = {}
    for k in draws[0]:
        accuracies = [accuracy(draw[k]) for draw in draws]
        results[str(k)] = {
            "accuracy": accuracies,
            "mean": float(np.mean(accuracies)),
            "std": float(np.std(accuracies)),
            "train_samples": k * num_classes,
        }
    return results


def format_table(report: dict) -> str:
    """One line per shot count: the train samples, the mean and std over seeds, and each seed's accuracy."""
    seeds = len(next(iter(report["shots"].values()))["accuracy"])
    lines = [
        f"{report['model']}: few-shot linear probe on {report['eval_split']} ({report['eval_samples']} samples), "
        f"l2_reg {report['l2_reg']:g}",
        "shots  train samples    mean     std  " + "  ".join(f"seed {seed}" for seed in range(seeds)),
    ]
    for k, row in report["shots"].items():
        per_seed = "  ".join(f"{accuracy:6.4f}" for accuracy in row["accuracy"])
        lines.append(f"{k:>5}  {row['train_samples']:>13}  {row['mean']:6.4f}  {row['std']:6.4f}  {per_seed}")
    return "\n".join(lines)
