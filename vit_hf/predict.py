"""Classify images with a fine-tuned model folder: one JSON line per image, top-k labels with their scores.

    python -m vit_hf.predict outputs/cifar10-vit-b16-224 cat.jpg photos/ --top-k 5 --batch-size 64

Folders are walked (recursively, sorted) for image files; the model runs batched, on the GPU when there is one.
"""

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from transformers import BaseImageProcessor, ViTForImageClassification, pipeline
from transformers.utils.logging import disable_progress_bar

from vit_hf.data.images import image_paths, load_image
from vit_hf.publish.model_dir import load_model_and_processor
from vit_hf.utils.errors import UserError, cli_entry


def predict(
    model: ViTForImageClassification,
    processor: BaseImageProcessor,
    paths: Sequence[Path],
    top_k: int = 5,
    batch_size: int = 32,
) -> Iterator[dict]:
    """Yield {"image": path, "predictions": [{"label", "score"}, ...]} per path, best first, batch by batch: the
    image-classification pipeline's answers, the images read as training reads them (upright, RGB)."""
    classifier = pipeline("image-classification", model=model, image_processor=processor, device=model.device)
    images = (load_image(path) for path in paths)
    answers = classifier(images, top_k=min(top_k, model.config.num_labels), batch_size=batch_size)
    for path, predictions in zip(paths, answers, strict=True):
        yield {"image": str(path), "predictions": predictions}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_hf.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a model folder (the output of a fine-tuning run or of vit_hf.convert)")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=5, help="how many labels to print per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    disable_progress_bar()  # stderr is for errors; stdout for the results
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be at least 1")
    paths = image_paths(args.images)
    model, processor = load_model_and_processor(args.model_dir)
    for line in predict(model, processor, paths, top_k=args.top_k, batch_size=args.batch_size):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
