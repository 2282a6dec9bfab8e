"""Export a model folder to ONNX (fp32, or int8 with --quantize int8), verified before it is written.

    python -m vit_hf.onnx outputs/cifar10-vit-b16-224 outputs/cifar10-onnx
    python -m vit_hf.onnx outputs/cifar10-vit-b16-224 outputs/cifar10-int8 --quantize int8 --recipe recipes/cifar10.json

OUT_DIR is a model folder like the others (model.onnx, config.json, preprocessor_config.json), which predict and
validate take as they take a PyTorch folder. Before it is written, the fp32 graph's logits must match PyTorch's within
1e-4 on real images (the first 64 rows of the recipe's split, the files of --images) or, without either, on seeded
sample images. With --quantize int8, the top-1 agreement with fp32 and, given --recipe, the accuracy of both on the
recipe's eval split (or --split) go into OUT_DIR's onnx_export.json and README.md. A failed check writes nothing.
"""

import argparse
import json
from pathlib import Path

import datasets
from transformers.utils.logging import disable_progress_bar

from vit_hf.data.images import image_paths
from vit_hf.recipe import load_recipe
from vit_hf.serving.export import check_export_packages
from vit_hf.serving.onnx_card import summary_lines
from vit_hf.serving.onnx_folder import check_source, export_folder
from vit_hf.serving.preprocess import Preprocessing
from vit_hf.serving.verify_inputs import file_inputs, recipe_split, sample_inputs, split_inputs
from vit_hf.utils.errors import UserError, cli_entry

CHECK_ROWS = 64  # rows of the split the fp32 logits are compared on


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_hf.onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a PyTorch model folder (the output of a fine-tuning run or of convert)")
    parser.add_argument("out_dir", help="the ONNX folder to write (replaced if it exists)")
    parser.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantization of the weights")
    parser.add_argument("--recipe", help="a recipe whose data section gives the real images to verify on")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument(
        "--split",
        help="with --recipe: train, eval or test (the recipe's splits) or a split expression (default: eval)",
    )
    parser.add_argument("--images", nargs="+", help="without --recipe: image files or folders to verify on")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def _inputs(args: argparse.Namespace, model_dir: Path):
    """The inputs the fp32 logits are checked on, and those the int8 figures are measured on."""
    if (args.set or args.split) and not args.recipe:
        raise UserError("--set and --split choose data of a recipe: give --recipe too")
    if args.recipe and args.images:
        raise UserError("--recipe and --images each give the images to verify on: give one")
    preprocessing = Preprocessing.from_folder(model_dir)
    if args.recipe:
        recipe = load_recipe(args.recipe, args.set)
        split = recipe_split(recipe, args.split)
        size = preprocessing.height
        check = split_inputs(recipe["data"], split, size, args.batch_size, limit=CHECK_ROWS)
        return check, split_inputs(recipe["data"], split, size, args.batch_size) if args.quantize else check
    if args.images:
        inputs = file_inputs(image_paths(args.images), preprocessing, args.batch_size)
    else:
        inputs = sample_inputs(preprocessing)
    return inputs, inputs


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    disable_progress_bar()  # stderr is for errors; stdout for the results
    datasets.disable_progress_bars()
    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise UserError(f"{out_dir}: the export needs its own folder, not the model folder")
    check_source(model_dir)
    check_export_packages()  # before the data set loads
    check, figures = _inputs(args, model_dir)
    report = export_folder(model_dir, out_dir, check, figures, args.quantize)
    for line in summary_lines(report, out_dir):
        print(line)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
