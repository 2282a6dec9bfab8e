"""Classify images with a fine-tuned model folder: one JSON line per image, top-k labels with their scores.

    python -m vit_hf.predict outputs/cifar10-vit-b16-224 cat.jpg photos/ --top-k 5 --batch-size 64

Folders are walked (recursively, sorted) for image files; the model runs batched, on the GPU when there is one.
"""

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import AutoImageProcessor, BaseImageProcessor, ViTForImageClassification
from transformers.utils.logging import disable_progress_bar

from vit_hf.publish.model_dir import load_model_dir
from vit_hf.utils.errors import UserError, cli_entry

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by INPUTS: files as given, folders walked for image files in sorted order."""
    paths = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"{path}: no image files in this folder")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return paths


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at PATH in RGB, upright by its EXIF orientation as transformers' `load_image` (the pipeline's input)
    and datasets' Image decode (training) make it; a UserError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            ImageOps.exif_transpose(image, in_place=True)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        raise UserError(f"{path}: not a readable image file") from None
    except Image.DecompressionBombError as error:  # not an OSError: Pillow's guard against a huge declared size
        raise UserError(f"{path}: {error}") from None


def load_model(
    model_dir: str | os.PathLike, attn_implementation: str | None = None
) -> tuple[ViTForImageClassification, BaseImageProcessor]:
    """The model of a model folder, in eval mode on the GPU when there is one, and its image processor."""
    model = load_model_dir(model_dir, attn_implementation)
    try:
        processor = AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise UserError(f"{model_dir}: cannot be loaded ({' '.join(str(error).split())})") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


@torch.no_grad()
def predict(
    model: ViTForImageClassification,
    processor: BaseImageProcessor,
    paths: Sequence[Path],
    top_k: int = 5,
    batch_size: int = 32,
) -> Iterator[dict]:
    """Yield {"image": path, "predictions": [{"label", "score"}, ...]} per path, best first, batch by batch."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pixel_values = processor([load_image(path) for path in chunk], return_tensors="pt")["pixel_values"]
        probabilities = model(pixel_values.to(model.device)).logits.float().softmax(dim=-1)
        scores, indices = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        for path, row_scores, row_indices in zip(chunk, scores.tolist(), indices.tolist(), strict=True):
            predictions = [
                {"label": model.config.id2label[index], "score": score}
                for score, index in zip(row_scores, row_indices, strict=True)
            ]
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
    model, processor = load_model(args.model_dir)
    for line in predict(model, processor, paths, top_k=args.top_k, batch_size=args.batch_size):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
