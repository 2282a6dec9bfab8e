"""See what a recipe's training augmentation does: a grid of the first training images as the loop would feed them.

    python -m vit_hf.preview recipes/cifar10_scratch.json --out augmented.png --count 32
    python -m vit_hf.preview recipes/cifar10.json --out official.png --set model.image_size=96

The images go through the loop's own loader settings and `TrainInputs` (crop, resize, flip, RandAugment or
TrivialAugment, random erasing, Mixup or CutMix), seeded with the recipe's seed, so the grid is what training sees.
"""

import argparse
from pathlib import Path

import torch

from vit_hf.data.augment import save_preview_grid
from vit_hf.data.inputs import TrainInputs
from vit_hf.data.loader import make_loader
from vit_hf.data.sources import load_splits
from vit_hf.data.stream_loader import make_stream_loader
from vit_hf.recipe import load_recipe
from vit_hf.utils.errors import UserError, cli_entry
from vit_hf.utils.files import atomic_file


def augmented_batch(recipe: dict, count: int) -> torch.Tensor:
    """The first COUNT training images of RECIPE after its training augmentation, in [-1, 1].

    They are read with the loop's settings (image size, crop and flip in the workers for photos, bad_images), so any
    data set the loop accepts works, streamed ones too (the first rows of the stream, in shard order); undecodable
    images that bad_images "skip" drops are left out.
    """
    seed = recipe["train"]["seed"]
    splits = load_splits(recipe["data"], seed=seed, streaming_ok=True)
    inputs = TrainInputs(recipe, len(splits.class_names), torch.Generator().manual_seed(seed))
    options = {"seed": seed, "bad_images": recipe["data"]["bad_images"], "image_size": inputs.transform.image_size,
               "crop_scale": inputs.transform.crop_scale, "hflip": inputs.transform.hflip}  # fmt: skip
    columns = splits.image_column, splits.label_column
    if splits.streaming:
        loader = make_stream_loader(splits.train, *columns, len(splits.class_names), count, shuffle=False, **options)
    else:
        rows = splits.train.select(range(min(count, len(splits.train))))
        count = len(rows)
        loader = make_loader(rows, *columns, count, shuffle=False, **options)
    batch = next(iter(loader), None)
    if batch is None or not len(batch["index"]):
        raise UserError(f"data.train_split: none of its first {count} images can be decoded")
    images, _ = inputs(batch)
    return images


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vit_hf.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a JSON recipe")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--count", type=int, default=32, help="how many images (default 32)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE", help="override a field")
    args = parser.parse_args(argv)
    if args.count < 1:
        raise UserError(f"--count must be at least 1, got {args.count}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: expected a .png file name")
    images = augmented_batch(load_recipe(args.recipe, args.set), args.count)
    with atomic_file(out) as staging:
        save_preview_grid(images, staging)
    print(f"wrote {out}: {len(images)} augmented training images")


if __name__ == "__main__":
    main()
