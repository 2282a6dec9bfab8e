"""Classify images with a model folder, PyTorch or ONNX: one JSON line per image, top-k labels with their scores.

    python -m vit_hf.predict outputs/cifar10-vit-b16-224 cat.jpg photos/ --top-k 5 --batch-size 64
    python -m vit_hf.predict outputs/cifar10-int8 photos/ --skip-bad

Folders are walked (recursively, sorted) for image files. Worker threads read and resize the next batches (as the
folder's image processor resizes) while the model runs on this one, on the GPU when there is one; the scores are
pipeline("image-classification")'s. An ONNX folder (python -m vit_hf.onnx) runs in ONNX Runtime, without torch.
With --skip-bad, a file that cannot be read gets its own line, {"image": ..., "error": ...}, and the run goes on.
"""

import argparse
import json

from vit_hf.data.images import image_paths
from vit_hf.serving.backends import folder_kind, load_served
from vit_hf.serving.classify import classify_paths
from vit_hf.utils.errors import UserError, cli_entry


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit_hf.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a model folder (a fine-tuning run's, convert's, or an ONNX export)")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=5, help="how many labels to print per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--skip-bad", action="store_true", help="report a file that cannot be read and go on")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be at least 1")
    paths = image_paths(args.images)
    if folder_kind(args.model_dir) == "pytorch":
        from transformers.utils.logging import disable_progress_bar  # here: an ONNX folder runs without transformers

        disable_progress_bar()  # stderr is for errors; stdout for the results
    backend, preprocessing = load_served(args.model_dir)
    for line in classify_paths(backend, preprocessing, paths, args.top_k, args.batch_size, args.skip_bad):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
