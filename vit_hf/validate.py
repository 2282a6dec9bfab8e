"""Evaluate a model folder on a data set split: accuracy, top-5 accuracy, per-class accuracy, a confusion matrix.

    python -m vit_hf.validate outputs/cifar10-vit-b16-224 --recipe recipes/cifar10.json --split test
    python -m vit_hf.validate MODEL_DIR --dataset cifar100 --split "test[:1000]" --batch-size 256 --out reports/
    accelerate launch -m vit_hf.validate MODEL_DIR --recipe recipes/cifar10.json

Writes validate.json and confusion_matrix.png into --out (default: the model folder). Runs on any number of
processes, as the fine-tuning loop does; every sample of the split is counted exactly once. A recipe with
data.streaming reads the split as a stream (a split name or absolute rows, `test[:1000]`). MODEL_DIR may be an ONNX
folder (python -m vit_hf.onnx): the same arguments, the same outputs.
"""

import argparse
import json
from pathlib import Path

from transformers.utils.logging import disable_progress_bar

from vit_hf.recipe import SPLIT_FIELDS, load_recipe, resolve_recipe, section_defaults
from vit_hf.serving.backends import check_folder
from vit_hf.training.validation import validate
from vit_hf.utils.errors import UserError, cli_entry


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


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_hf.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a model folder (the output of a fine-tuning run or of vit_hf.convert)")
    parser.add_argument("--recipe", help="a recipe whose data section names the data set")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field (of the defaults without --recipe)",
    )
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
    model_dir = check_folder(args.model_dir)
    # Without --recipe, --set overrides the defaults (data.split_order=stored, say).
    recipe = load_recipe(args.recipe, args.set) if args.recipe else resolve_recipe({}, args.set) if args.set else None
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
