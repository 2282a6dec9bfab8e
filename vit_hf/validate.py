"""Evaluate a model folder on a data set split: accuracy, top-5 accuracy, per-class accuracy, a confusion matrix.

    python -m vit_hf.validate outputs/cifar10-vit-b16-224 --recipe recipes/cifar10.json --split test
    python -m vit_hf.validate MODEL_DIR --dataset cifar100 --split "test[:1000]" --batch-size 256 --out reports/
    accelerate launch -m vit_hf.validate MODEL_DIR --recipe recipes/cifar10.json

Writes validate.json and confusion_matrix.png into --out (default: the model folder). Runs on any number of
processes, as the fine-tuning loop does; every sample of the split is counted exactly once. A recipe with
data.streaming reads the split as a stream (a split name or absolute rows, `test[:1000]`).
"""

import argparse
import json
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from matplotlib.figure import Figure
from transformers import ViTForImageClassification
from transformers.utils.logging import disable_progress_bar

from vit_hf.data.sources import DeviceTransform, load_splits, make_loader
from vit_hf.data.streaming import make_stream_loader
from vit_hf.publish.model_dir import check_model_dir, load_model_dir
from vit_hf.recipe import SPLIT_FIELDS, load_recipe, section_defaults
from vit_hf.training.evaluation import evaluate_split, gloo_on_cpu
from vit_hf.utils.errors import UserError, cli_entry
from vit_hf.utils.files import atomic_file, write_json

ANNOTATE_UP_TO = 20  # classes; beyond this the cells are too small to print in


def data_section(args: argparse.Namespace, recipe: dict | None) -> tuple[dict, str]:
    """The `data` section to load (RECIPE's, or the defaults) with the command line's keys, and the split.

    With a recipe, --split train, eval or test name the recipe's splits; any other value is a split expression.
    """
    data = dict(recipe["data"]) if recipe else section_defaults("data")
    if args.dataset is not None:
        data["dataset"] = parse_dataset(args.dataset)
    for key in ("image_column", "label_column"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    split = args.split or (data["test_split"] if recipe else "test")
    if recipe and split in SPLIT_FIELDS:
        split = recipe["data"][SPLIT_FIELDS[split]]
        if split is None:
            raise UserError(f"--split {args.split}: the recipe's data.{SPLIT_FIELDS[args.split]} is null")
    return data, split


def parse_dataset(value: str) -> str | dict:
    """--dataset: a JSON object (the keyword arguments of datasets.load_dataset) or a short name such as cifar10."""
    if not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise UserError(f"--dataset: not a valid JSON object ({error})") from None


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


def plot_confusion(confusion: np.ndarray, class_names: list[str], title: str) -> Figure:
    """The row-normalised confusion matrix, class names on the axes; counts in the cells up to 20 classes."""
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
        model = load_model_dir(model_dir)
    check_classes(model, model_dir, splits.class_names, splits.name)
    image_size = model.config.image_size
    columns = splits.image_column, splits.label_column
    options = {"num_workers": num_workers, "bad_images": data.get("bad_images", "stop"), "image_size": image_size}
    if splits.streaming:  # each process reads its part once; the parts padded to as many batches (vit_hf.streaming)
        loader = make_stream_loader(
            splits.test, *columns, len(splits.class_names), batch_size, shuffle=False, even=True,
            process_index=accelerator.process_index, num_processes=accelerator.num_processes,
            device=accelerator.device, **options,
        )  # fmt: skip
    else:
        loader = accelerator.prepare(make_loader(splits.test, *columns, batch_size, shuffle=False, **options))
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


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_hf.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a model folder (the output of a fine-tuning run or of vit_hf.convert)")
    parser.add_argument("--recipe", help="a recipe whose data section names the data set")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument(
        "--split",
        help="a split expression (test, train[98%%:], test[:1000]); with --recipe, train, eval and test name the "
        "recipe's splits (default: the recipe's test split, or test)",
    )
    parser.add_argument("--dataset", help='a short name (cifar10, cifar100) or a JSON object: {"path": "parquet", ...}')
    parser.add_argument("--image-column", help="the image column (default: the first Image column)")
    parser.add_argument("--label-column", help="the label column (default: label, fine_label or the first ClassLabel)")
    parser.add_argument("--batch-size", type=int, help="images per process and batch (default: the recipe's, or 128)")
    parser.add_argument("--num-workers", type=int, help="data loader workers (default: the recipe's, or 2)")
    parser.add_argument("--out", help="where to write validate.json and confusion_matrix.png (default: MODEL_DIR)")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    disable_progress_bar()
    if args.set and not args.recipe:
        raise UserError("--set overrides fields of a recipe: give --recipe too")
    model_dir = check_model_dir(args.model_dir)
    recipe = load_recipe(args.recipe, args.set) if args.recipe else None
    data, split = data_section(args, recipe)
    batch_size = (
        args.batch_size if args.batch_size is not None else (recipe["train"]["eval_batch_size"] if recipe else 128)
    )
    num_workers = args.num_workers if args.num_workers is not None else data.get("num_workers", 2)
    if batch_size < 1 or num_workers < 0:
        raise UserError("--batch-size must be at least 1 and --num-workers at least 0")
    validate(model_dir, data, split, batch_size, num_workers, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
