"""Few-shot linear probes on frozen features, as big_vision's `fewshot_lsr` (the ViT paper's few-shot figures).

    python -m vit_hf.fewshot ViT-B_16 --recipe recipes/cifar10.json --shots 1,5,10,25 --seeds 3
    accelerate launch -m vit_hf.fewshot outputs/cifar10-vit-b16-224 --recipe recipes/cifar10.json --out reports/

The features, the draws of the examples and the probe are described in `vit_hf.training.fewshot`; fewshot.json holds,
for each K, each seed's accuracy, their mean and standard deviation and the train sample count.
"""

import argparse
import math
from pathlib import Path

from transformers.utils.logging import disable_progress_bar

from vit_hf.recipe import load_recipe
from vit_hf.training.fewshot import DEFAULT_L2_REG, fewshot
from vit_hf.utils.errors import UserError, cli_entry


def parse_shots(text: str) -> list[int]:
    """--shots: comma-separated positive integers, returned sorted and without repeats."""
    try:
        shots = [int(part) for part in text.split(",")]
    except ValueError:
        shots = []
    if not shots or min(shots) < 1:
        raise UserError(f"--shots: expected comma-separated positive integers such as 1,5,10,25, got {text!r}")
    return sorted(set(shots))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_hf.fewshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an official .npz, a URL or catalog name (such as ViT-B_16), or a model folder")
    parser.add_argument("--recipe", required=True, help="a recipe: its data section names the data set and splits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--shots", default="1,5,10,25", help="examples per class, comma-separated (default: 1,5,10,25)")
    parser.add_argument("--seeds", type=int, default=3, help="draws of the examples per shot count (default: 3)")
    parser.add_argument(
        "--l2-reg",
        type=float,
        default=DEFAULT_L2_REG,
        help="the ridge penalty lambda of W = (X^T X + lambda I)^-1 X^T Y, on standardised features and targets in "
        "{-1, 1} (default: 2**10, big_vision's)",
    )
    parser.add_argument(
        "--eval-split",
        default="test",
        help="where accuracy is measured: train, eval or test name the recipe's splits, any other value is a split "
        "expression such as test[:1000] (default: test)",
    )
    parser.add_argument("--batch-size", type=int, help="images per process and batch (default: the recipe's eval)")
    parser.add_argument("--num-workers", type=int, help="data loader workers (default: the recipe's)")
    parser.add_argument("--out", help="where to write fewshot.json (default: MODEL if a folder, else here)")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    disable_progress_bar()
    shots = parse_shots(args.shots)
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    if not (math.isfinite(args.l2_reg) and args.l2_reg > 0):
        raise UserError(f"--l2-reg must be positive, got {args.l2_reg}")
    recipe = load_recipe(args.recipe, args.set)
    batch_size = args.batch_size if args.batch_size is not None else recipe["train"]["eval_batch_size"]
    num_workers = args.num_workers if args.num_workers is not None else recipe["data"]["num_workers"]
    if batch_size < 1 or num_workers < 0:
        raise UserError("--batch-size must be at least 1 and --num-workers at least 0")
    out = Path(args.out or (args.model if Path(args.model).is_dir() else "."))
    fewshot(args.model, recipe, shots, args.seeds, args.l2_reg, args.eval_split, batch_size, num_workers, out)


if __name__ == "__main__":
    main()
