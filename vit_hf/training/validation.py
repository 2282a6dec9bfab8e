"""Evaluation of a model folder on a data set split (`python -m vit_hf.validate`): accuracy, top-5 accuracy,
per-class accuracy and a confusion matrix, written as validate.json and confusion_matrix.png.

Runs on any number of processes, as the fine-tuning loop does; every sample of the split is counted exactly once.
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from accelerate import Accelerator
from transformers import ViTForImageClassification

from vit_hf.data.loader import make_loader
from vit_hf.data.sources import load_splits
from vit_hf.data.stream_loader import make_stream_loader
from vit_hf.data.transforms import DeviceTransform
from vit_hf.serving.onnx_module import load_classifier
from vit_hf.training.accelerator import gloo_on_cpu
from vit_hf.training.evaluation import evaluate_split
from vit_hf.utils.errors import UserError
from vit_hf.utils.files import atomic_file, write_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ANNOTATE_UP_TO = 20  # classes; beyond this the cells are too small to print in


def check_classes(model: ViTForImageClassification, model_dir: Path, class_names: list[str], dataset: str) -> None:
    """Refuse a model whose classes are not the data set's ClassLabel names, in the same order."""
    model_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if model_names != class_names:

        def show(names: list[str]) -> str:
            return f"{len(names)}: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"

        raise UserError(
            f"the classes of model {model_dir} ({show(model_names)}) are not those of data set {dataset!r} "
            f"({show(class_names)}), in the same order"
        )


def summarise(result: dict, class_names: list[str]) -> tuple[dict, np.ndarray]:
    """Top-1, top-5 and per-class accuracy and the confusion matrix (rows: true class) of evaluate_split's result."""
    labels, predictions = result["labels"], result["predictions"]
    confusion = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    per_class = {}
    for i, name in enumerate(class_names):
        samples = int(confusion[i].sum())
        per_class[name] = {"accuracy": float(confusion[i, i] / samples) if samples else None, "samples": samples}
    summary = {
        "accuracy": result["accuracy"],
        "top5_accuracy": float(np.mean((result["top_k"][:, :5] == labels[:, None]).any(axis=1))),
        "loss": result["loss_mean"],
        "samples": result["samples"],
        "per_class": per_class,
    }
    return summary, confusion


def format_table(report: dict) -> str:
    """The report as a readable table: the totals, then one line per class."""
    width = max(len("class"), *(len(name) for name in report["per_class"]))
    lines = [
        f"{report['model']} on {report['split']}: {report['samples']} samples",
        f"accuracy {report['accuracy']:.4f}   top-5 accuracy {report['top5_accuracy']:.4f}   loss {report['loss']:.4f}",
        "",
        f"{'class':<{width}}  accuracy  samples",
    ]
    for name, row in report["per_class"].items():
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{name:<{width}}  {accuracy:>8}  {row['samples']:>7}")
    return "\n".join(lines)


def plot_confusion(confusion: np.ndarray, class_names: list[str], title: str) -> "Figure":
    """The row-normalised confusion matrix, class names on the axes; counts in the cells up to 20 classes."""
    from matplotlib.figure import Figure  # imported when the figure is drawn, not with the module

    n = len(class_names)
    totals = confusion.sum(axis=1, keepdims=True)
    fractions = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    side = min(max(6.0, 0.45 * n + 2.5), 40.0)
    font = 9 if n <= ANNOTATE_UP_TO else max(4, 9 - n // 25)
    fig = Figure(figsize=(side + 1.2, side))  # no pyplot: the Agg canvas, no global state
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), class_names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    if n <= ANNOTATE_UP_TO:
        for (row, column), count in np.ndenumerate(confusion):
            if count:
                colour = "white" if fractions[row, column] > 0.5 else "black"
                ax.text(column, row, str(count), ha="center", va="center", fontsize=8, color=colour)
    fig.tight_layout()
    return fig


def write_outputs(report: dict, confusion: np.ndarray, out: Path) -> tuple[Path, Path]:
    """validate.json and confusion_matrix.png in OUT, each written under a temporary name and then renamed."""
    json_path = write_json(out / "validate.json", report)
    title = f"{Path(report['model']).name} on {report['split']}: accuracy {report['accuracy']:.4f}"
    fig = plot_confusion(confusion, list(report["per_class"]), title)
    png_path = out / "confusion_matrix.png"
    with atomic_file(png_path) as staging:
        fig.savefig(staging, format="png", dpi=120)
    return json_path, png_path


def validate(
    model_dir: Path, data: dict, split: str, batch_size: int, num_workers: int = 0, out: Path | None = None
) -> dict:
    """Evaluate MODEL_DIR on SPLIT of the data set of DATA (a recipe's `data` section); returns the report.

    The main process prints the report and writes validate.json and confusion_matrix.png into OUT (or MODEL_DIR).
    """
    accelerator = Accelerator(cpu=gloo_on_cpu())
    with accelerator.main_process_first():
        try:
            data = {**data, "train_split": None, "eval_split": None, "test_split": split}
            splits = load_splits(data, streaming_ok=True)
        except UserError as error:
            raise UserError(str(error).replace("test_split", "split", 1)) from None
        model = load_classifier(model_dir)  # a PyTorch or an ONNX folder
    check_classes(model, model_dir, splits.class_names, splits.name)
    image_size = model.config.image_size
    options = {"num_workers": num_workers, "bad_images": data.get("bad_images", "stop"), "image_size": image_size}
    loader = _test_loader(splits, accelerator, batch_size, options)
    model = model.to(accelerator.device)
    result = evaluate_split(model, loader, DeviceTransform(image_size, train=False), accelerator)
    summary, confusion = summarise(result, splits.class_names)
    report = {
        **summary,
        "split": split,
        "dataset": data["dataset"],
        "model": str(model_dir),
        "num_processes": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        json_path, png_path = write_outputs(report, confusion, out or model_dir)
        print(format_table(report))
        print(json.dumps(report))
        print(f"wrote {json_path} and {png_path}")
    accelerator.wait_for_everyone()
    return report


def _test_loader(splits, accelerator: Accelerator, batch_size: int, options: dict):
    """The batches of SPLITS.test for this process, in order."""
    columns = splits.image_column, splits.label_column
    if splits.streaming:  # each process reads its part once, the parts padded to as many batches
        return make_stream_loader(
            splits.test, *columns, len(splits.class_names), batch_size, shuffle=False, even=True,
            process_index=accelerator.process_index, num_processes=accelerator.num_processes,
            device=accelerator.device, **options,
        )  # fmt: skip
    return accelerator.prepare(make_loader(splits.test, *columns, batch_size, shuffle=False, **options))
